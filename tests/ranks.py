"""Distributed tests' processes: ``run_on_ranks`` spawns ``world`` CPU processes on gloo, each running
``body(rank, world)`` and saving what it returns, and gives back every rank's result. One launch per test module
(process start-up and compile dominate the time); a hang fails the test after the group's timeout instead."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kronograph.errors import KronographError


def _worker(rank: int, body: Callable[[int, int], Any], world: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(out) / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(body(rank, world), Path(out) / f"rank{rank}.pt")
    except KronographError:
        raise
    except Exception:
        # Most likely a collective broken by a peer that raised and left: exit after it, so that the launcher
        # (which reports the first rank to end) names the peer's own error, not this consequence of it.
        time.sleep(2)
        raise
    finally:
        dist.destroy_process_group()


def run_on_ranks(body: Callable[[int, int], Any], world: int, out: Path) -> list[Any]:
    """Every rank's ``body(rank, world)``, in rank order (``body``: a module-level function, pickled by name)."""
    # Spawned, not forked: a rank forked from a pytest worker that had run the CLI's onnxruntime training (its
    # progress bar's monitor thread, onnxruntime's pools) inherited a lock held at the fork and hung in torch.export's
    # logging (test_cli_train_onnx.py then test_kfac_ddp_wrapped.py in one process hung at 9d0673a too). Each rank
    # runs torch on one thread.
    mp.start_processes(_worker, args=(body, world, str(out)), nprocs=world, join=True, start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt") for rank in range(world)]


def on_one_thread(body: Callable[[], Any]) -> Any:
    """``body()`` with torch on one thread, as each rank runs (the single-process run the ranks are held to)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return body()
    finally:
        torch.set_num_threads(threads)


def refusal(make: Callable[[], Any]) -> str | None:
    """The KronographError's message ``make()`` raises on this rank (None when it raises none): a rank's refusal,
    saved for the test process to check."""
    try:
        make()
    except KronographError as error:
        return str(error)
    return None


def preconditioned_loop(model, forward, precond, batches, rank: int = 0, world: int = 1) -> list[float]:
    """The README's KFACPreconditioner loop (SGD with momentum, cross-entropy) on this rank's share of each batch,
    ``forward`` the wrapper called (DDP, or the FSDP-sharded model itself); returns the local losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in batches:
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        with precond.track():
            loss = torch.nn.functional.cross_entropy(forward(x), y)
            loss.backward()
        info = precond.step(x)
        assert info["preconditioned"] == len(precond.curvature.solving) and not info["rejected_statistics"], info
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def whole_state(model) -> dict[str, torch.Tensor]:
    """A model's state with every sharded tensor (an FSDP2 DTensor) gathered whole."""
    return {name: value.full_tensor() if hasattr(value, "full_tensor") else value.clone()
            for name, value in model.state_dict().items()}
