"""KFACPreconditioner in a user's own SGD / AdamW loop: grafted (the default) against the raw solve (issue 10, item 5).

    python benchmarks/preconditioner_loop.py [--steps 150] [--clip 1.0] [--optimizers sgd,adamw] [--threads 2]
                                             [--activation-rows N,...] [--kl-clip K,...]
                                             [--problem NAME] [--batch N]

The loop a user writes: zero_grad, forward and backward inside ``precond.track()``, ``precond.step()``,
then the loop's own ``clip_grad_norm_`` (max norm ``--clip``, 1 as most training scripts have it; 0: no
clipping) and ``opt.step()``. Model: the first-try suite's ResNet-18-style net (conv-BN-ReLU, two residual
stages) on Fashion-MNIST, batch 128, PyTorch's default initialisation, the same weights and batches for
every run. Optimizers with their usual settings: SGD (lr 0.1, momentum 0.9, Nesterov) and AdamW (lr 1e-3).
For each: the plain optimizer, the preconditioner with its defaults (``graft="norm"``), and the raw solve
(``graft=None``). Prints a Markdown table with the training loss (a fixed sample of 1,000 training images,
evaluation mode) after the steps, the worst loss seen on the way, the milliseconds per step and whether
the run diverged (a loss above 1e3 or not finite). ``--activation-rows`` adds a grafted run per N with A from at
most N activation rows a layer (``KFACPreconditioner(..., activation_rows=N)``; 0: every row; the default is 1024).
``--kl-clip`` adds a grafted and a raw-solve run per bound (``KFACPreconditioner(..., kl_clip=K)``, 'none' for no
bound; the default is 1e-3 at lr 0.1, so the bound the preconditioner assumes is the loop's own with SGD).
``--problem`` takes another classification model of the first-try suite (benchmarks/first_try.py) and ``--batch``
another batch size (the same loop at batches of 1-2 examples: BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kronograph

sys.path.insert(0, str(Path(__file__).parent))
from first_try import all_problems, users_optimizer  # noqa: E402  (the suite's models, data and loops)


def run(problem, optimizer: str, options: dict | None, steps: int, clip: float, batch: int) -> dict:
    """One loop; ``options``: the preconditioner's arguments (None: no preconditioner)."""
    x, y = problem.x, problem.y
    torch.manual_seed(0)
    model = problem.model()
    params = list(model.parameters())
    opt = users_optimizer(params, optimizer)
    precond = None
    if options is not None:
        cm = kronograph.compile(model, (x[:2],), loss="cross_entropy")
        precond = kronograph.optim.KFACPreconditioner(cm, seed=0, **options)
    order = torch.Generator().manual_seed(0)
    sample = torch.randperm(len(x), generator=order)[:1000]

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            value = float(F.cross_entropy(model(x[sample]), y[sample]))
        model.train()
        return value

    worst, clock = evaluate(), 0.0
    for step in range(steps):
        index = torch.randint(len(x), (batch,), generator=order)
        start = time.perf_counter()
        opt.zero_grad()
        if precond is None:
            F.cross_entropy(model(x[index]), y[index]).backward()
        else:
            with precond.track():
                F.cross_entropy(model(x[index]), y[index]).backward()
        if precond is not None:
            precond.step()  # right after the backward; the user's clipping stays where it was, before opt.step()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        clock += time.perf_counter() - start
        if step % 10 == 9:
            value = evaluate()
            worst = max(worst, value) if math.isfinite(value) else math.inf
            if not math.isfinite(value) or value > 1e3:
                return {"loss": value, "worst": worst, "ms": 1000 * clock / (step + 1), "diverged": True}
    return {"loss": evaluate(), "worst": worst, "ms": 1000 * clock / steps, "diverged": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--optimizers", default="sgd,adamw")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activation-rows", default="", help="comma-separated N (0: every row): a grafted run each")
    parser.add_argument("--kl-clip", default="", help="comma-separated bounds ('none': no bound): two runs each")
    parser.add_argument("--problem", default="fashion-resnet", help="a cross-entropy problem of first_try.py")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = all_problems()[args.problem]()
    if problem.loss != "cross_entropy":
        parser.error(f"{args.problem} is not a cross-entropy problem")
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, {args.problem}, {args.steps} steps, "
          f"batch {args.batch}, clip {args.clip:g}")
    print("| optimizer | preconditioner | loss after | worst loss on the way | ms/step | diverged |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for optimizer in args.optimizers.split(","):
        variants = [("none", None), ("graft='norm' (default)", {}), ("graft=None (raw solve)", {"graft": None})]
        variants += [(f"graft='norm', activation_rows={int(n) or None}", {"activation_rows": int(n) or None})
                     for n in args.activation_rows.split(",") if n]
        for value in filter(None, args.kl_clip.split(",")):
            clip = None if value == "none" else float(value)
            variants += [(f"graft='norm', kl_clip={clip}", {"kl_clip": clip}),
                         (f"graft=None, kl_clip={clip}", {"graft": None, "kl_clip": clip})]
        for label, options in variants:
            r = run(problem, optimizer, options, args.steps, args.clip, args.batch)
            print(f"| {optimizer} | {label} | {r['loss']:.4g} | {r['worst']:.4g} | {r['ms']:.0f} | "
                  f"{'yes' if r['diverged'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
