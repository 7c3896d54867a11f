"""Training loss against wall time on the K-FAC paper's MNIST autoencoder: KFAC(cm) defaults, Adam, SGD-Nesterov.

    python benchmarks/mnist_per_second.py [--seconds 40] [--threads 2] [--out benchmarks/results]

All optimizers start from the same (sparse) initial weights and see the same batches of 512. Every few
seconds the training loss on a fixed 10,000-image subset of MNIST train is evaluated; the evaluation time
is not charged to the optimizer. The loss is the paper's: sigmoid cross-entropy summed over the 784
pixels, averaged over images. Writes a PNG plot and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import kronograph  # noqa: E402
from kronograph.cli.builtins import DeepAutoencoder  # noqa: E402
from kronograph.cli.datasets import load_dataset  # noqa: E402


def loss_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(model(x), x, reduction="none").sum(1).mean()


def make_step(name: str, model: torch.nn.Module, example: torch.Tensor):
    if name == "kfac":
        optimizer = kronograph.optim.KFAC(kronograph.compile(model, (example,), loss="sigmoid_cross_entropy"), seed=0)
        return lambda x: optimizer.step(x, x)
    if name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:  # the paper's baseline: SGD with Nesterov momentum
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss_of(model, x).backward()
        optimizer.step()

    return step


def run(name: str, initial: torch.nn.Module, train: torch.Tensor, probe: torch.Tensor, seconds: float,
        every: float, batch: int) -> list[tuple[float, int, float]]:
    model = copy.deepcopy(initial)
    step = make_step(name, model, train[:8])
    generator = torch.Generator().manual_seed(0)
    curve, elapsed, steps, next_probe = [], 0.0, 0, 0.0
    while elapsed < seconds:
        if elapsed >= next_probe:
            with torch.no_grad():
                curve.append((elapsed, steps, float(loss_of(model, probe))))
            next_probe += every
        x = train[torch.randint(0, len(train), (batch,), generator=generator)]
        start = time.perf_counter()
        step(x)
        elapsed += time.perf_counter() - start
        steps += 1
    with torch.no_grad():
        curve.append((elapsed, steps, float(loss_of(model, probe))))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = torch.from_numpy(load_dataset("mnist", "train").x)
    probe = train[:10000]
    torch.manual_seed(0)
    initial = DeepAutoencoder()
    curves = {name: run(name, initial, train, probe, args.seconds, args.seconds / 20, args.batch)
              for name in ("kfac", "adam", "sgd-nesterov")}

    args.out.mkdir(parents=True, exist_ok=True)
    figure, (by_time, by_step) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        by_time.plot([t for t, _, _ in curve], [v for _, _, v in curve], label=name)
        by_step.plot([s for _, s, _ in curve], [v for _, _, v in curve], label=name)
    for axis, label in ((by_time, "seconds (optimizer time)"), (by_step, "iterations")):
        axis.set_xlabel(label)
        axis.set_ylabel("training loss (sum over pixels)")
        axis.set_yscale("log")
        axis.legend()
    figure.suptitle(f"MNIST autoencoder, batch {args.batch}, {args.threads} threads")
    figure.tight_layout()
    figure.savefig(args.out / "mnist_per_second.png", dpi=120)

    marks = [args.seconds / 4, args.seconds / 2, args.seconds]
    print(f"| optimizer | steps | " + " | ".join(f"loss at {m:.0f} s" for m in marks) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in marks) + " |")
    for name, curve in curves.items():
        values = [[v for t, _, v in curve if t <= m + 1e-9][-1] for m in marks]  # the last probe by then
        print(f"| {name} | {curve[-1][1]} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    print(f"\nplot: {args.out / 'mnist_per_second.png'}")


if __name__ == "__main__":
    main()
