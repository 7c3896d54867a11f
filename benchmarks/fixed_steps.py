"""K-FAC variants (or Adam) for a fixed number of steps on a first-try problem, over seeds: the loss a step,
free of the machine's speed, beside the step's cost. Single-seed fixed-step comparisons are noisy (the
default-init autoencoder gives 65-101 at 150 steps across seeds): compare three seeds before a default.

    python benchmarks/fixed_steps.py mnist-classifier 1200 --seeds 0,1,2 defaults '{}' \\
        longer '{"max_gamma_every": 80}' adam '{"lr": 1e-3}'

Each variant is a label and the JSON of ``KFAC(cm, **options)``'s keywords (a label starting with "adam" runs
torch.optim.Adam with them). Prints the loss on a fixed 1,000-example sample of the training set at half and
at all the steps, the milliseconds a step (evaluation not charged) and K-FAC's undone steps. ``--batch N``
replaces the problem's batch size (batches of 1-3 examples: BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import kronograph
from kronograph.runtime.losses import get_loss

from first_try import all_problems


def run(name: str, steps: int, label: str, options: dict, seed: int, batch: int | None = None) -> dict:
    """One variant from the seed's weights on the seed's batches."""
    problem = all_problems()[name]()
    loss = get_loss(problem.loss)
    sample = torch.randperm(len(problem.x), generator=torch.Generator().manual_seed(0))[:1000]
    torch.manual_seed(seed)
    model = problem.model()
    adam = label.startswith("adam")
    cm = kronograph.compile(model, (problem.x[:2],), loss=problem.loss)
    opt = torch.optim.Adam(model.parameters(), **options) if adam else kronograph.optim.KFAC(cm, seed=seed, **options)
    order = torch.Generator().manual_seed(seed)
    clock, marks, info = 0.0, [], {}
    for k in range(steps):
        index = torch.randint(len(problem.x), (batch or problem.batch,), generator=order)
        x, y = problem.x[index], problem.y[index]
        start = time.perf_counter()
        if adam:
            opt.zero_grad()
            loss(model(x), y).backward()
            opt.step()
        else:
            info = opt.step(x, y)
        clock += time.perf_counter() - start
        if k + 1 in (steps // 2, steps):
            model.eval()
            with torch.no_grad():
                marks.append(float(loss(model(problem.x[sample]), problem.y[sample])))
            model.train()
    return {"half": marks[0], "final": marks[-1], "ms": 1000 * clock / steps, "undone": info.get("rejected_steps", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("problem")
    parser.add_argument("steps", type=int)
    parser.add_argument("variants", nargs="+", help="label JSON label JSON ...")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--batch", type=int, default=None, help="examples a batch (default: the problem's)")
    args = parser.parse_args()
    if len(args.variants) % 2:
        parser.error("give each variant as a label and its JSON options")
    torch.set_num_threads(2)
    pairs = [(args.variants[i], json.loads(args.variants[i + 1])) for i in range(0, len(args.variants), 2)]
    print(f"| variant | seed | loss at {args.steps // 2} | loss at {args.steps} | ms a step | undone |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, options in pairs:
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run(args.problem, args.steps, label, options, seed, args.batch)
            print(f"| {label} | {seed} | {r['half']:.4g} | {r['final']:.4g} | {r['ms']:.1f} | {r['undone']} |",
                  flush=True)


if __name__ == "__main__":
    main()
