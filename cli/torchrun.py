"""`kronograph train` on several processes: under torchrun, or re-launched under it by ``--nproc N``.

A process started by torchrun (WORLD_SIZE > 1, with RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) is one rank
of a data-parallel run (``Ranks.from_env``). Every rank builds the same run (same settings, seeds, weights and
data order) and initialises the process group itself before the optimizer is made (``Ranks.connect``: gloo for
a model on the CPU, nccl on CUDA, with ``--dist-timeout``); each takes its rows of every global batch
(``Ranks.rows``: --batch-size stays the global batch, split as torch.tensor_split does, rank r the r-th piece)
and kronograph.optim.KFAC makes every rank take the single process's step. Only K-FAC on the torch engine runs
this way so far (``check_supported``). Only rank 0 writes (run folder, metrics, checkpoints, plots, model),
computes the validation loss (on the whole validation set, as one process does; the others wait for it in
their next collective) and prints; the checkpoint holds the single-process state, the same on every rank, so
any number of processes (1 included) can resume it.

``launch`` is ``--nproc N``: the same command line, less --nproc, under ``python -m torch.distributed.run
--standalone --nproc-per-node N -m kronograph.cli``; its exit code is torchrun's (1 when a rank failed; 130 after
Ctrl-C). Ctrl-C under torchrun: the ranks agree after every step on whether one got it, so all stop after the
same step and rank 0 checkpoints it (a rank ignores the second SIGINT within 2 s: torchrun passes the terminal's on).

A rank that fails ends the run: it exits non-zero with its message (``error: rank R of W ...``), torchrun then
stops the others, and a rank left waiting in a collective fails there after --dist-timeout at the latest.

Test hook: the environment variable ``KRONOGRAPH_TEST_FAIL_AT=RANK:STEP`` (set by tests/test_cli_torchrun.py
only) makes rank RANK raise a RuntimeError as it starts step STEP (from 1), to check that a failing rank ends
the whole run instead of leaving the others hanging.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kronograph.errors import KronographError

#: What runs on several processes so far: (optimizer, engine).
SUPPORTED = ("kfac", "torch")
#: Seconds a rank waits for the others in a collective (rank 0 checkpoints, validates and plots meanwhile).
DEFAULT_TIMEOUT = 1800
#: The test hook's environment variable (see the module's docstring).
FAIL_AT = "KRONOGRAPH_TEST_FAIL_AT"


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise KronographError(f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but {name} is "
                              f"{os.environ.get(name, 'not set')!r}; start the processes with torchrun "
                              "(or kronograph train --nproc N)") from None


@dataclass
class Ranks:
    """This process's place in a torchrun job: rank, number of ranks, rank on this machine."""

    rank: int
    world: int
    local_rank: int
    connected: bool = False  # this process initialised the group (and destroys it in close)

    @classmethod
    def from_env(cls) -> Ranks | None:
        """The torchrun job this process is part of (WORLD_SIZE > 1), or None: one process."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise KronographError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None
        if world <= 1:
            return None
        return cls(_env_int("RANK"), world, _env_int("LOCAL_RANK"))

    @property
    def writer(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def pin_device(self) -> None:
        """On a machine with GPUs, make cuda mean this rank's GPU (LOCAL_RANK) before the model is built."""
        if torch.cuda.is_available() and self.local_rank < torch.cuda.device_count():
            torch.cuda.set_device(self.local_rank)

    def connect(self, device: torch.device, timeout: int) -> None:
        """Initialise torch.distributed's default group from torchrun's environment: nccl for a model on CUDA,
        else gloo; a collective waits ``timeout`` seconds at most."""
        if dist.is_initialized():  # the caller's own group: used, and left to it to close
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout),
                                **({"device_id": device} if backend == "nccl" else {}))
        self.connected = True

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch: the rank-th of ``world`` pieces as equal as possible (the first
        pieces one longer), in rank order, as torch.tensor_split cuts them."""
        return torch.tensor_split(index, self.world)[self.rank]

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank (one all_reduce: every rank must call it at the same point)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a collective)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def close(self) -> None:
        if self.connected and dist.is_initialized():
            dist.destroy_process_group()
        self.connected = False


def rank_prefix() -> str:
    """'rank R of W: ' for an error line of a process torchrun started, else ''."""
    try:
        ranks = Ranks.from_env()
    except KronographError:
        return ""
    return f"{ranks}: " if ranks is not None else ""


def failure_text(error: BaseException) -> str:
    """What a rank's failure says: the exception, and for a collective that failed (a peer gone, a timeout)
    that another rank probably stopped first."""
    text = " ".join(str(error).split())[:400]
    lost = isinstance(error, dist.DistError) or any(
        word in text for word in ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "gloo"))
    why = ("a collective with the other ranks failed, so another rank has probably stopped (its own error "
           "names the cause); " if lost else "")
    return f"{type(error).__name__}: {text}; {why}torchrun stops the other ranks"


def check_supported(settings: dict[str, Any], processes: int) -> None:
    """Refuse what does not run on several processes yet: any optimizer but K-FAC, the onnxruntime engine."""
    optimizer, engine = SUPPORTED
    if settings["optimizer"] != optimizer or settings.get("engine", "torch") != engine:
        given = (f"--optimizer {settings['optimizer']}" if settings["optimizer"] != optimizer
                 else f"the {settings['engine']} engine")
        raise KronographError(
            f"kronograph train on {processes} processes (torchrun or --nproc) runs --optimizer {optimizer} on the "
            f"{engine} engine only so far, not {given}; train it in one process (drop --nproc, no torchrun), or "
            f"use --optimizer {optimizer}" + (f" with --engine {engine} on a PyTorch module" if settings.get(
                "engine") != engine else ""))


def check_batches(smallest: int, ranks: Ranks) -> None:
    if smallest < ranks.world:
        raise KronographError(f"the batches of {smallest} examples are smaller than the {ranks.world} processes and "
                              "every process needs at least one example of every batch; give a larger --batch-size "
                              "(or --batch-start), or fewer processes")


def failure_hook(ranks: Ranks | None) -> int | None:
    """The step at which this rank raises (the test hook ``KRONOGRAPH_TEST_FAIL_AT=RANK:STEP``), or None."""
    text = os.environ.get(FAIL_AT)
    if not text or ranks is None:
        return None
    rank, _, step = text.partition(":")
    return int(step) if int(rank) == ranks.rank else None


def without_nproc(args: Sequence[str]) -> list[str]:
    """The command line ``args`` less ``--nproc N`` / ``--nproc=N``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def launch(args: Sequence[str], processes: int) -> int:
    """Run ``kronograph ARGS`` under torchrun on ``processes`` local processes; torchrun's exit code (130 after a
    Ctrl-C). The processes get OMP_NUM_THREADS = cores / processes unless it is set. torchrun runs in a session
    of its own, so that a Ctrl-C reaches the ranks once, through it (torchrun passes SIGINT on): they finish the
    step, rank 0 checkpoints, and all stop at the same step."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "kronograph.cli", *args]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    child = subprocess.Popen(command, env=env, start_new_session=True)
    try:  # a SIGTERM to this process goes on to torchrun, which stops the ranks
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))
    except ValueError:  # not the main thread
        previous = None
    interrupted = False
    try:
        while True:
            try:
                code = child.wait()
                return 130 if interrupted and code else code  # torchrun says 1 when its ranks stop on SIGINT
            except KeyboardInterrupt:
                interrupted = True
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
