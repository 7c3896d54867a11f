"""Data-parallel K-FAC on CPU (gloo): step time and bytes communicated per step against the number of ranks
(issue 16, "Performance").

    python benchmarks/distributed_step.py [--ranks 1,2] [--steps 20] [--warm-up 5]
                                          [--optimizers kfac-default,kfac-paper,precond,kaisa,...]

Problem: the first-try suite's "autoencoder-default" (benchmarks/first_try.py: MNIST, 784-1000-500-250-30 and
mirror, PyTorch's default initialisation, sigmoid cross-entropy), a global batch of 1000 per step, rank r taking
rows r N / W .. (r + 1) N / W of it. Each number of ranks W is one ``torch.multiprocessing.spawn`` of W processes
on the gloo backend (as tests/ranks.py spawns them), one torch thread each; every rank has the same weights (seed
0) and the same global batches. Per optimizer: ``--warm-up`` steps, then ``--steps`` timed steps.

* ``kfac-default``, ``kfac-paper``: ``kronograph.optim.KFAC(cm, preset=..., seed=0)``, ``step(x_r, y_r)`` on the
  rank's slice; no DDP (KFAC all-reduces the gradient itself).
* ``precond``: ``kronograph.optim.KFACPreconditioner(cm, seed=0)`` (defaults: empirical Fisher, stats_every=1,
  inverse_every=20, damping 1e-3, graft="norm") in a torch.optim.SGD loop (lr 1e-3, momentum 0.9), the model in
  DistributedDataParallel (also at W = 1).
* ``precond-owners``: ``precond`` with ``grad_worker_fraction=1/W`` (KAISA's memory-optimal mode: each layer's
  inverses on its owner alone, which solves the layer's gradient and shares it in one all_gather a step).
* ``precond-fsdp``: the same preconditioner loop on the model compiled plain, then sharded by FSDP2's
  ``fully_shard`` (each Linear, then the root) instead of DDP: FSDP's parameter all_gathers and gradient
  reduce_scatters, and the preconditioner's all_gather of each layer's gradient (``DTensor.full_tensor``, counted
  as the all_gather of the rank's shard).
* ``kfac-paper-fsdp``: ``kfac-paper`` on the model compiled plain, then sharded by ``fully_shard`` (each Linear,
  then the root): each step gathers the weights whole once (FSDP's all_gathers, "parameters") and KFAC runs as
  without FSDP.
* ``kfac-paper-bf16``, ``precond-bf16``: the same with ``communication_dtype="bfloat16"`` (the factors' all_reduce
  in bfloat16, the counts in a second, float64 one).
* ``kaisa``: kfac-pytorch's ``kfac.preconditioner.KFACPreconditioner(ddp_model, lr=1e-3)`` with its defaults
  (factor_update_steps=1, inv_update_steps=1, eigen decompositions, COMM_OPT), the same SGD loop and DDP;
  ``kaisa-matched``: the same with kronograph's schedule, factor_update_steps=1, inv_update_steps=20 (damping
  1e-3 and factor_decay 0.95 are already its defaults and kronograph's); ``kaisa-mem``: ``kaisa-matched`` with
  grad_worker_fraction=1/W (its MEM-OPT, beside ``precond-owners``). Run when ``import kfac`` works (set
  KFAC_PYTORCH_PATH to a checkout of github.com/gpauloski/kfac-pytorch to put it on sys.path); otherwise the
  script says "kfac-pytorch: not importable" and goes on without it.

Step time: wall time of a whole training step (forward, backward, preconditioner, update), median over the
timed steps on rank 0.

Bytes: inside this script only, torch.distributed's all_reduce, all_reduce_coalesced, broadcast, all_gather,
all_gather_into_tensor, all_gather_coalesced, reduce_scatter, reduce_scatter_tensor, reduce, gather, scatter,
all_to_all_single and the deprecated _all_gather_base / _reduce_scatter_base are replaced by wrappers that record
each call's buffer (async_op=True calls go through the same functions; a collective that calls another one is
counted once). DDP's gradient all-reduce runs in its C++ Reducer, past Python, so each DDP model gets a comm
hook that calls torch's own ``allreduce_hook``, whose ``dist.all_reduce`` of each gradient bucket the wrapper
then counts: exact, not an estimate. What a rank "sends" as counted here: an all_reduce's buffer (every rank),
a broadcast's buffer at its root only (the other ranks receive), an all_gather's input, a reduce_scatter's input.
Each collective is put in a phase by the Python function that issued it (the call stack at the collective):
parameters (FSDP's all_gathers of the weights), gradient (DDP's buckets, KFAC's loss + gradient buffer, KAISA's
gradient broadcasts, FSDP's reduce_scatters, the preconditioner's all_gather of a sharded gradient), factors
(kronograph's ``average_statistics``, kfac-pytorch's factor all-reduce buckets), inverses (kronograph's
``invert_across_ranks``, kfac-pytorch's eigen-decomposition broadcasts), other (batch sizes, the quadratic
model's Gram sums, the loss after the step, ...). Only the timed steps are counted; construction-time collectives
(DDP's parameter broadcast, kfac-pytorch's new_group, ...) are not.

Printed: a table of the measurements per optimizer and W (ms per step; bytes per step per rank, the mean over the
timed steps and the ranks, by phase), the collectives seen (calls and bytes per call), and a cost MODEL, not a
measurement, for 4 and 8 ranks from the per-collective sizes measured at the largest W > 1: a ring all_reduce
sends 2 (W - 1) / W of its buffer per rank, a broadcast its buffer once, at the root (the mean over ranks is the
total / W), an all_gather (W - 1) times its input, the input taken as the W-th part of the gathered buffer (even
shares), a reduce_scatter (W - 1) / W of its input; the other sizes are assumed independent of W (each depends on
the model only).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

OPTIMIZERS = ("kfac-default", "kfac-paper", "kfac-paper-bf16", "kfac-paper-fsdp", "precond", "precond-bf16",
              "precond-owners", "precond-fsdp", "kaisa", "kaisa-matched", "kaisa-mem")
KAISA = ("kaisa", "kaisa-matched", "kaisa-mem")
PHASES = ("parameters", "gradient", "factors", "inverses", "other")
LR, MOMENTUM, INVERSE_EVERY = 1e-3, 0.9, 20

#: function on the call stack at a collective -> (phase, label); the innermost match wins
ISSUERS = {
    "_ddp_gradient_hook": ("gradient", "DDP gradient buckets"),
    "_gradient_across_ranks": ("gradient", "KFAC loss + gradient buffer"),
    "broadcast_grad": ("gradient", "KAISA gradient broadcast"),
    "average_statistics": ("factors", "kronograph factor all_reduce"),
    "allreduce_bucketed": ("factors", "kfac-pytorch factor buckets"),
    "flush_allreduce_buckets": ("factors", "kfac-pytorch factor buckets"),
    "reduce_a_factor": ("factors", "kfac-pytorch factor all_reduce"),
    "reduce_g_factor": ("factors", "kfac-pytorch factor all_reduce"),
    "invert_across_ranks": ("inverses", "kronograph inverse all_gather"),
    "foreach_all_gather": ("parameters", "FSDP parameter all_gather"),
    "foreach_reduce": ("gradient", "FSDP gradient reduce_scatter"),
    "_whole_grad": ("gradient", "kronograph gradient all_gather (FSDP)"),
    "_from_owners": ("gradient", "kronograph solves from their owners"),
    "broadcast_a_inv": ("inverses", "kfac-pytorch A eigen broadcast"),
    "broadcast_g_inv": ("inverses", "kfac-pytorch G eigen broadcast"),
    "batch_slice": ("other", "KFAC batch sizes"),
    "_fisher_gram": ("other", "KFAC quadratic-model Gram sums"),
    "_objective": ("other", "KFAC loss after the step"),
    "example_shape": ("other", "KFAC outputs' shape"),
    "shared_seed": ("other", "KFAC shared seed"),
}
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "broadcast", "all_gather", "all_gather_into_tensor",
               "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "reduce", "gather", "scatter",
               "all_to_all_single", "_all_gather_base", "_reduce_scatter_base", "all_gather_single",
               "reduce_scatter_single")


# -- counting ------------------------------------------------------------------------------------------
class Counter:
    """The collectives this rank issues while ``on``: (kind, phase, label, bytes sent, role, dtype) per call."""

    def __init__(self) -> None:
        self.on = False
        self.records: list[tuple[str, str, str, int, str, str]] = []
        self.local = threading.local()  # nesting depth: a collective built on another one counts once


COUNTER = Counter()


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _dtype(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).replace("torch.", "")
    if isinstance(value, (list, tuple)) and value:
        return _dtype(value[0])
    return "-"


def _issuer() -> tuple[str, str]:
    frame, fallback = sys._getframe(2), None
    while frame is not None:
        name = frame.f_code.co_name
        if name in ISSUERS:
            return ISSUERS[name]
        path = frame.f_code.co_filename
        if fallback is None and "torch" not in path and not path.endswith("distributed_step.py"):
            fallback = f"{Path(path).stem}.{name}"
        frame = frame.f_back
    return "other", fallback or "?"


def _sent(kind: str, args: tuple, kwargs: dict) -> tuple[Any, str]:
    """The buffer this rank contributes to the collective, and its role ("all", "root" or "leaf")."""
    def arg(i: int, name: str) -> Any:
        return args[i] if len(args) > i else kwargs.get(name)

    if kind == "broadcast":
        src, group = arg(1, "src"), arg(2, "group")
        if src is None and kwargs.get("group_src") is not None:
            src = dist.get_global_rank(group or dist.group.WORLD, kwargs["group_src"])
        return arg(0, "tensor"), "root" if src == dist.get_rank() else "leaf"
    if kind in ("all_reduce", "reduce"):
        return arg(0, "tensor"), "all"
    if kind == "all_reduce_coalesced":
        return arg(0, "tensors"), "all"
    if kind in ("all_gather", "all_gather_coalesced"):
        return arg(1, "tensor" if kind == "all_gather" else "input_tensor_list"), "all"
    if kind in ("all_gather_into_tensor", "_all_gather_base", "reduce_scatter_tensor", "_reduce_scatter_base",
                "all_to_all_single", "all_gather_single", "reduce_scatter_single"):
        return arg(1, "input_tensor" if "gather" in kind else "input"), "all"
    if kind == "reduce_scatter":
        return arg(1, "input_list"), "all"
    if kind == "gather":
        return arg(0, "tensor"), "all"
    if kind == "scatter":
        return arg(1, "scatter_list"), "all"
    return None, "all"


def install_counters() -> None:
    """Replace torch.distributed's collectives (module attributes: every ``dist.x(...)`` call finds them) by
    counting wrappers. In this process only; nothing is patched outside the benchmark."""
    for kind in COLLECTIVES:
        original = getattr(dist, kind, None)
        if original is None or getattr(original, "_counted", False):
            continue

        def wrapper(*args: Any, __original=original, __kind=kind, **kwargs: Any) -> Any:
            depth = getattr(COUNTER.local, "depth", 0)
            if COUNTER.on and depth == 0:
                buffer, role = _sent(__kind, args, kwargs)
                phase, label = _issuer()
                sent = 0 if role == "leaf" else _nbytes(buffer)
                COUNTER.records.append((__kind, phase, label, sent, role, _dtype(buffer)))
            COUNTER.local.depth = depth + 1
            try:
                return __original(*args, **kwargs)
            finally:
                COUNTER.local.depth = depth

        wrapper._counted = True  # type: ignore[attr-defined]
        wrapper.__name__ = kind
        setattr(dist, kind, wrapper)


def count_full_tensor() -> None:
    """DTensor.full_tensor gathers through torch's functional collectives, past ``dist``: counted here as the
    all_gather of its local shard (what a rank sends)."""
    from torch.distributed.tensor import DTensor

    original = DTensor.full_tensor
    if getattr(original, "_counted", False):
        return

    def full_tensor(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if COUNTER.on and getattr(COUNTER.local, "depth", 0) == 0:
            phase, label = _issuer()
            local = self.to_local()
            COUNTER.records.append(("all_gather", phase, label, _nbytes(local), "all", _dtype(local)))
        return original(self, *args, **kwargs)

    full_tensor._counted = True  # type: ignore[attr-defined]
    DTensor.full_tensor = full_tensor


def _ddp_gradient_hook(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """DDP's default gradient all-reduce (torch's allreduce_hook), issued from Python so that it is counted."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.allreduce_hook(state, bucket)


def _ddp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    wrapped = DistributedDataParallel(model)
    wrapped.register_comm_hook(None, _ddp_gradient_hook)
    return wrapped


# -- kfac-pytorch ----------------------------------------------------------------------------------------
def kfac_pytorch() -> tuple[Any, str]:
    """kfac-pytorch's module ``kfac.preconditioner`` (None when not importable) and a line saying where from."""
    path = os.environ.get("KFAC_PYTORCH_PATH")
    if path and path not in sys.path:
        sys.path.insert(0, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "NVIDIA Apex is not installed": its pure-PyTorch fallback is used
            import kfac.preconditioner
    except Exception as error:  # noqa: BLE001 (any failure to import means: run without it)
        return None, f"kfac-pytorch: not importable ({type(error).__name__}: {error})"
    from importlib import metadata

    try:
        version = metadata.version("kfac_pytorch")
    except metadata.PackageNotFoundError:
        version = "?"
    return kfac.preconditioner, f"kfac-pytorch: {version} from {Path(kfac.__file__).parent}"


# -- one rank ----------------------------------------------------------------------------------------------
def _runner(name: str, problem: Any, example: torch.Tensor):
    """A fresh model (seed 0) and its ``step(x, y) -> local loss`` for optimizer ``name``."""
    import kronograph
    from kronograph.runtime.losses import get_loss

    torch.manual_seed(0)
    model = problem.model()
    loss_fn = get_loss(problem.loss)
    narrow = {"communication_dtype": "bfloat16"} if name.endswith("-bf16") else {}
    if name == "precond-owners":
        narrow = {"grad_worker_fraction": 1 / dist.get_world_size()}
    if name.endswith("-fsdp"):  # compiled plain, then each Linear and the root sharded in place
        from torch.distributed.fsdp import fully_shard

        cm = kronograph.compile(model, (example,), loss=problem.loss)
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        wrapped = fully_shard(model)
    if name.startswith("kfac-"):
        if not name.endswith("-fsdp"):
            cm = kronograph.compile(model, (example,), loss=problem.loss)
        preset = name.removeprefix("kfac-").removesuffix("-bf16").removesuffix("-fsdp")
        opt = kronograph.optim.KFAC(cm, preset=preset, seed=0, **narrow)
        return lambda x, y: float(opt.step(x, y)["loss"])
    if name != "precond-fsdp":
        wrapped = _ddp(model)
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    if name.startswith("precond"):
        if name != "precond-fsdp":
            cm = kronograph.compile(model, (example,), loss=problem.loss)  # the unwrapped module
        precond = kronograph.optim.KFACPreconditioner(cm, seed=0, **narrow)

        def step(x: torch.Tensor, y: torch.Tensor) -> float:
            sgd.zero_grad()
            with precond.track():
                loss = loss_fn(wrapped(x), y)
                loss.backward()
            precond.step(x)
            sgd.step()
            return float(loss.detach())
        return step
    module, _ = kfac_pytorch()
    schedule = {} if name == "kaisa" else {"factor_update_steps": 1, "inv_update_steps": INVERSE_EVERY}
    if name == "kaisa-mem":  # its MEM-OPT: one grad worker per layer, which broadcasts the preconditioned gradient
        schedule["grad_worker_fraction"] = 1 / dist.get_world_size()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precond = module.KFACPreconditioner(wrapped, lr=LR, **schedule)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        sgd.zero_grad()
        loss = loss_fn(wrapped(x), y)
        loss.backward()
        precond.step()
        sgd.step()
        return float(loss.detach())
    return step


def _worker(rank: int, world: int, options: dict, out: str) -> None:
    torch.set_num_threads(1)
    # kfac-pytorch's full backward hooks on the first layer, whose input needs no gradient: harmless, said per step
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    dist.init_process_group("gloo", init_method=f"file://{Path(out) / 'rendezvous'}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        from first_try import problems

        install_counters()
        count_full_tensor()
        problem = problems()["autoencoder-default"]()
        steps, warm_up, batch = options["steps"], options["warm_up"], options["batch"]
        order = torch.Generator().manual_seed(0)
        batches = [torch.randperm(len(problem.x), generator=order)[:batch] for _ in range(warm_up + steps)]
        lo, hi = rank * batch // world, (rank + 1) * batch // world
        results = {}
        for name in options["optimizers"]:
            step = _runner(name, problem, problem.x[:2])
            times, per_step, losses = [], [], []
            for i, index in enumerate(batches):
                x, y = problem.x[index[lo:hi]], problem.y[index[lo:hi]]
                timed = i >= warm_up
                COUNTER.records, COUNTER.on = [], timed
                start = time.perf_counter()
                losses.append(step(x, y))
                elapsed = time.perf_counter() - start
                COUNTER.on = False
                if timed:
                    times.append(elapsed)
                    per_step.append(list(COUNTER.records))
            results[name] = {"times": times, "records": per_step, "loss": losses[-1], "losses": losses}
            dist.barrier()
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_world(world: int, options: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, options, out), nprocs=world, join=True)
        return [torch.load(Path(out) / f"rank{rank}.pt") for rank in range(world)]


# -- reports ------------------------------------------------------------------------------------------------
def sent_by_phase(ranks: list[dict], name: str) -> dict[str, float]:
    """Bytes sent per step per rank (mean over the timed steps and the ranks), by phase."""
    totals = dict.fromkeys(PHASES, 0.0)
    for result in ranks:
        steps = result[name]["records"]
        for records in steps:
            for _, phase, _, nbytes, _, _ in records:
                totals[phase] += nbytes / len(steps) / len(ranks)
    return totals


def collectives(ranks: list[dict], name: str) -> dict[tuple, dict]:
    """Per (kind, phase, label, dtype): calls per step per rank, the bytes per call seen, the bytes sent per step
    per rank, and the ring model's ingredients (all_reduce bytes per rank, broadcast bytes summed over ranks)."""
    table: dict[tuple, dict] = {}
    for result in ranks:
        steps = result[name]["records"]
        for records in steps:
            for kind, phase, label, nbytes, role, dtype in records:
                row = table.setdefault((kind, phase, label, dtype),
                                       {"calls": 0.0, "sizes": collections.Counter(), "sent": 0.0, "roots": 0})
                row["calls"] += 1 / len(steps) / len(ranks)
                row["sent"] += nbytes / len(steps) / len(ranks)
                if role != "leaf":
                    row["sizes"][nbytes] += 1
                if role == "root":
                    row["roots"] += 1
    return table


def modelled(table: dict[tuple, dict], world: int, measured_world: int) -> dict[str, float]:
    """The cost model's bytes sent per step per rank (mean over ranks) at ``world`` ranks, by phase."""
    totals = dict.fromkeys(PHASES, 0.0)
    if world == 1:  # nothing leaves a single process
        return totals
    for (kind, phase, _, _), row in table.items():
        per_rank = row["sent"]  # bytes per step per rank as counted at ``measured_world``
        if kind == "broadcast":  # the buffers' total over the ranks, each sent once at its root, shared by W ranks
            totals[phase] += per_rank * measured_world / world
        elif kind in ("all_reduce", "all_reduce_coalesced"):
            totals[phase] += 2 * (world - 1) / world * per_rank
        elif kind in ("all_gather", "all_gather_into_tensor", "all_gather_coalesced", "_all_gather_base",
                      "all_gather_single"):
            # the gathered buffer (W inputs) is the model's; at W ranks each input is taken as its W-th part (even
            # shares: kronograph's owners' triangles, whose padding benchmarks/inverse_balance.py gives exactly)
            totals[phase] += (world - 1) * per_rank * measured_world / world
        else:  # reduce_scatter and the rest: (W - 1) / W of the input
            totals[phase] += (world - 1) / world * per_rank
    return totals


def _b(value: float) -> str:
    return f"{value:,.0f}"


def report(results: dict[int, list[dict]], names: list[str]) -> None:
    print("\n## Measured (bytes: what each rank hands to collectives per step, mean over timed steps and ranks)\n")
    print("| optimizer | ranks | ms/step (median, rank 0) | collectives/step | parameters B | gradient B | factors B "
          "| inverses B | other B | total B/step/rank | steps with inverse traffic | last loss (rank 0) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        for world, ranks in sorted(results.items()):
            if name not in ranks[0]:
                continue
            sent = sent_by_phase(ranks, name)
            calls = sum(len(r) for r in ranks[0][name]["records"]) / len(ranks[0][name]["records"])
            inverse_steps = sum(any(rec[1] == "inverses" for rec in records)
                                for result in ranks for records in result[name]["records"]) / len(ranks)
            ms = 1000 * statistics.median(ranks[0][name]["times"])
            print(f"| {name} | {world} | {ms:.0f} | {calls:.1f} | {_b(sent['parameters'])} | {_b(sent['gradient'])} | "
                  f"{_b(sent['factors'])} | "
                  f"{_b(sent['inverses'])} | {_b(sent['other'])} | {_b(sum(sent.values()))} | {inverse_steps:g} | "
                  f"{ranks[0][name]['loss']:.4g} |", flush=True)
    if 1 in results:
        print("\nAt 1 rank kronograph and kfac-pytorch issue no collectives of their own; DDP still all-reduces its "
              "buckets there, within the one process: those bytes leave no process (the model below gives 0).")

    print("\n## Collectives seen (per rank, timed steps only)\n")
    print("| optimizer | ranks | collective | phase | issued by | dtype | calls/step/rank | bytes per call (x calls, "
          "all timed steps and ranks) | bytes/step/rank |")
    print("| --- | ---: | --- | --- | --- | --- | ---: | --- | ---: |")
    for name in names:
        for world, ranks in sorted(results.items()):
            if name not in ranks[0]:
                continue
            for (kind, phase, label, dtype), row in sorted(collectives(ranks, name).items(), key=lambda kv: kv[0][1]):
                sizes = ", ".join(f"{size:,} x{count}" for size, count in sorted(row["sizes"].items())[:4])
                if kind == "broadcast":
                    sizes += " (at the roots; the others receive)"
                print(f"| {name} | {world} | {kind} | {phase} | {label} | {dtype} | {row['calls']:.2f} | {sizes} | "
                      f"{_b(row['sent'])} |")

    multi = [w for w in results if w > 1]
    print("\n## MODEL, not a measurement: bytes sent per step per rank (mean over ranks) at W ranks\n")
    if not multi:
        print("(needs a run with more than one rank: with one, kronograph and kfac-pytorch issue no collectives)")
        return
    base = max(multi)
    print(f"From the per-collective sizes measured at {base} ranks, assumed independent of W. Ring all_reduce: "
          "2 (W - 1) / W of the buffer per rank; broadcast: the buffer once, at its root (mean over ranks: the "
          "total / W); all_gather: (W - 1) times the input, the input the gathered buffer's W-th part (even "
          "shares); reduce_scatter: (W - 1) / W of the input.\n")
    print("| optimizer | W | parameters B | gradient B | factors B | inverses B | other B | total B/step/rank |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        if name not in results[base][0]:
            continue
        table = collectives(results[base], name)
        for world in sorted({1, base, 4, 8}):
            model = modelled(table, world, base)
            print(f"| {name} | {world} | {_b(model['parameters'])} | {_b(model['gradient'])} | "
                  f"{_b(model['factors'])} | {_b(model['inverses'])} | {_b(model['other'])} | "
                  f"{_b(sum(model.values()))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--warm-up", type=int, default=5, help="untimed, uncounted steps first")
    parser.add_argument("--ranks", default="1,2", help="numbers of processes, one spawn each")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"any of {','.join(OPTIMIZERS)}")
    parser.add_argument("--batch", type=int, default=1000, help="global batch (each rank 1 / W of it)")
    args = parser.parse_args()
    names = args.optimizers.split(",")
    unknown = set(names) - set(OPTIMIZERS)
    if unknown:
        parser.error(f"unknown optimizers {sorted(unknown)}; choose from {','.join(OPTIMIZERS)}")
    module, where = kfac_pytorch()
    print(where)
    if module is None:
        names = [name for name in names if name not in KAISA]
    options = {"steps": args.steps, "warm_up": args.warm_up, "batch": args.batch, "optimizers": names}
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, gloo, 1 thread per rank, "
          f"autoencoder-default, global batch {args.batch}, {args.warm_up} warm-up + {args.steps} timed steps, "
          f"SGD loops: lr {LR:g}, momentum {MOMENTUM:g}")
    results = {}
    for world in (int(w) for w in args.ranks.split(",")):
        start = time.perf_counter()
        results[world] = run_world(world, options)
        print(f"{world} rank(s): {time.perf_counter() - start:.0f} s", flush=True)
    report(results, names)


if __name__ == "__main__":
    main()
