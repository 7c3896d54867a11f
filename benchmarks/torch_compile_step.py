"""KFACPreconditioner's loop step with and without torch.compile (issue 11, item 1).

    python benchmarks/torch_compile_step.py [--steps 40] [--backend auto] [--threads 2]

The loop a user writes, timed whole: zero_grad, forward and backward inside ``precond.track()`` (the
forward through ``torch.compile(model)`` or the module itself), ``precond.step()`` (statistics, inverses
every 20 steps: the defaults), SGD's step. Statistics steps run the compiled module eagerly (kronograph's
capture cannot see inside a compiled graph), the other steps run compiled, so the gain grows with
``stats_every``. Plain SGD without the preconditioner is timed too, for what compilation alone buys.

Model: the first-try suite's ResNet-18-style net (conv-BN-ReLU, two residual stages) on Fashion-MNIST,
batch 128, the same weights and batches for every run. The six runs advance in turn, one step each, so
that a machine shared with other work slows them alike; the first two steps of each (the first statistics
step and the first compiled step, where compilation happens; later compiled runs reuse inductor's cache)
are timed apart as warm-up, then ``--steps`` steps, with statistics at steps 11, 21, ... for
``stats_every=10``. ``--backend auto`` takes inductor when it compiles on this machine (it needs a C++
compiler on CPU), else aot_eager. Prints a Markdown table: the median milliseconds of statistics steps and
of the other steps, their mean weighted by how many there are (ms/step), the warm-up's seconds, and the
mean training loss of the last 10 steps (a sanity check: compiled kernels round differently, so a compiled
run drifts from the eager one over the steps; the statistics steps themselves are the eager computation).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kronograph

sys.path.insert(0, str(Path(__file__).parent))
from first_try import SmallResNet, _images  # noqa: E402  (the suite's model and data)

WARMUP = 2


def pick_backend(choice: str) -> str:
    """inductor if a tiny graph compiles and runs here, else aot_eager (``choice`` other than auto: itself)."""
    if choice != "auto":
        return choice
    try:
        torch.compile(lambda t: torch.relu(t) + 1, backend="inductor")(torch.randn(4))
        return "inductor"
    except Exception:  # noqa: BLE001  (no C++ compiler, or a broken toolchain: any failure means "not here")
        return "aot_eager"
    finally:
        torch._dynamo.reset()


class Loop:
    """One configuration of the loop; ``backend`` None: eager; ``stats_every`` None: plain SGD."""

    def __init__(self, x: torch.Tensor, backend: str | None, stats_every: int | None) -> None:
        torch.manual_seed(0)
        self.model = SmallResNet()
        self.called = self.model if backend is None else torch.compile(self.model, backend=backend)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.precond = None
        if stats_every is not None:
            cm = kronograph.compile(self.model, (x[:2],), loss="cross_entropy")
            self.precond = kronograph.optim.KFACPreconditioner(cm, stats_every=stats_every, seed=0)
        self.warmup, self.stats_ms, self.other_ms, self.losses = 0.0, [], [], []

    def step(self, x: torch.Tensor, y: torch.Tensor, warmup: bool) -> None:
        due = self.precond is not None and self.precond.statistics_due
        start = time.perf_counter()
        self.opt.zero_grad()
        if self.precond is None:
            loss = F.cross_entropy(self.called(x), y)
            loss.backward()
        else:
            with self.precond.track():
                loss = F.cross_entropy(self.called(x), y)
                loss.backward()
            self.precond.step()
        self.opt.step()
        elapsed = time.perf_counter() - start
        if warmup:
            self.warmup += elapsed
        else:
            (self.stats_ms if due else self.other_ms).append(1000 * elapsed)
        self.losses.append(float(loss.detach()))

    def row(self) -> dict:
        stats = statistics.median(self.stats_ms) if self.stats_ms else None
        other = statistics.median(self.other_ms) if self.other_ms else None
        counts = (len(self.stats_ms), len(self.other_ms))
        ms = ((stats or 0.0) * counts[0] + (other or 0.0) * counts[1]) / sum(counts)
        return {"ms": ms, "stats_ms": stats, "other_ms": other, "warmup": self.warmup,
                "loss": statistics.fmean(self.losses[-10:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--backend", default="auto", help="auto, inductor, aot_eager, eager")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backend = pick_backend(args.backend)
    x, y = _images("fashion-mnist")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"SmallResNet, batch 128, {args.steps} timed steps after {WARMUP} warm-up steps, "
          f"load average {load:.1f} at start")
    print("| model called | preconditioner | ms/step | statistics steps ms | other steps ms | warm-up s "
          "| loss, last 10 steps |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    torch._dynamo.reset()
    configs = [(stats_every, mode) for stats_every in (None, 1, 10) for mode in (None, backend)]
    loops = [Loop(x, mode, stats_every) for stats_every, mode in configs]
    order = torch.Generator().manual_seed(0)
    for step in range(WARMUP + args.steps):
        index = torch.randint(len(x), (128,), generator=order)
        for loop in loops:
            loop.step(x[index], y[index], warmup=step < WARMUP)
    for (stats_every, mode), loop in zip(configs, loops):
        r = loop.row()
        label = "none (SGD)" if stats_every is None else f"stats every {stats_every}"
        cells = [f"{r[k]:.0f}" if r[k] is not None else "-" for k in ("ms", "stats_ms", "other_ms")]
        print(f"| {'eager' if mode is None else f'torch.compile ({mode})'} | {label} | {' | '.join(cells)} | "
              f"{r['warmup']:.1f} | {r['loss']:.4f} |")

if __name__ == "__main__":
    main()
