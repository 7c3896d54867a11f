"""Where a step of ``KFAC(cm)`` goes, phase by phase, on the first-try suite's problems (issue 10).

    python benchmarks/kfac_phases.py fashion-resnet [--steps 20] [--warm-up 30] [--preset default] [--options JSON]

Runs ``--warm-up`` steps (the start, when inverses are refreshed every step and gamma moves fastest, is
left out), then ``--steps`` timed steps on random batches of the problem, and prints the milliseconds per
step of each phase of ``KFAC.timings`` (statistics, gradient, inverses, precondition, qmodel: the exact-Fisher
products of the quadratic model, damping: the forward for rho, update) beside a plain Adam step
(forward, backward, update) on the same batches. Problems and models are those of benchmarks/first_try.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import kronograph
from kronograph.runtime.losses import get_loss

sys.path.insert(0, str(Path(__file__).parent))
from first_try import all_problems  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("problem", choices=sorted(all_problems()))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warm-up", type=int, default=30)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--options", default="{}", help="JSON of KFAC's keywords beside the preset")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problem = all_problems()[args.problem]()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(len(problem.x), (problem.batch,), generator=generator)
               for _ in range(args.warm_up + args.steps)]

    torch.manual_seed(0)
    model = problem.model()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (problem.x[:2],), loss=problem.loss), preset=args.preset,
                                seed=0, **json.loads(args.options))
    for index in batches[: args.warm_up]:
        opt.step(problem.x[index], problem.y[index])
    opt.timings.clear()
    start = time.perf_counter()
    for index in batches[args.warm_up :]:
        opt.step(problem.x[index], problem.y[index])
    kfac_ms = 1000 * (time.perf_counter() - start) / args.steps

    torch.manual_seed(0)
    model = problem.model()
    adam, loss = torch.optim.Adam(model.parameters(), lr=1e-3), get_loss(problem.loss)
    for number, index in enumerate(batches):
        if number == args.warm_up:
            start = time.perf_counter()
        adam.zero_grad()
        loss(model(problem.x[index]), problem.y[index]).backward()
        adam.step()
    adam_ms = 1000 * (time.perf_counter() - start) / args.steps

    phases = ", ".join(f"{name} {1000 * seconds / args.steps:.0f}" for name, seconds in opt.timings.items())
    print(f"| {args.problem} | {kfac_ms:.0f} | {adam_ms:.0f} | {kfac_ms / adam_ms:.1f} | {phases} |")


if __name__ == "__main__":
    main()
