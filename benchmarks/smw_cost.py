"""What an SMW step costs against N_2 (issue 14): D_t is N_2 x N_2 for the natural gradient and
N_2 m_L x N_2 m_L for Gauss-Newton, built from layer-wise Grams, and GN needs one backward per output unit.

    python benchmarks/smw_cost.py [--threads 2] [--steps 10] [--n2 10,30,100,300]

On MNIST, for the thesis's classifier (784-500-10 logistic, sec 5.8, batch N_1 = max(60, N_2)) and the K-FAC
paper's autoencoder (784-1000-500-250-30-250-500-1000-784, batch 1000 as chapter 4's): milliseconds a step of
SMW-NG, SMW-NG-BD and SMW-GN, the ratio to an SGD step on the same batches, and the bytes of D_t (float32).
GN on the autoencoder (m_L = 784) is only reported, not run: D_t alone is (N_2 784)^2 floats and a step
784 backward passes. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

import kronograph
from kronograph.cli.builtins import DeepAutoencoder
from kronograph.cli.datasets import load_dataset
from kronograph.runtime.methods import METHODS

sys.path.insert(0, str(Path(__file__).parent))
from thesis_models import mnist_classifier  # noqa: E402


def seconds_per_step(name: str, cm, xs: list[torch.Tensor], ys: list[torch.Tensor], **settings) -> float:
    opt = METHODS[name](cm, seed=0, **settings)
    opt.step(xs[0], ys[0])  # warm-up
    start = time.perf_counter()
    for x, y in zip(xs[1:], ys[1:]):
        opt.step(x, y)
    return (time.perf_counter() - start) / (len(xs) - 1)


def size(nbytes: int) -> str:
    return f"{nbytes / 2 ** 10:.1f} KiB" if nbytes < 2 ** 20 else f"{nbytes / 2 ** 20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--n2", default="10,30,100,300")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", "train")
    images, labels = torch.from_numpy(data.x), torch.from_numpy(data.y)
    generator = torch.Generator().manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}\n")
    print("| model | N_2 | batch | SGD ms | SMW-NG ms (x SGD) | SMW-NG-BD ms (x SGD) | SMW-GN ms (x SGD) | D_t NG | D_t GN |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model_name in ("classifier", "autoencoder"):
        for n2 in (int(v) for v in args.n2.split(",")):
            batch = max(60, n2) if model_name == "classifier" else 1000
            index = [torch.randint(len(images), (batch,), generator=generator) for _ in range(args.steps + 1)]
            xs = [images[i] for i in index]
            ys = [labels[i] for i in index] if model_name == "classifier" else xs
            torch.manual_seed(0)
            if model_name == "classifier":
                model, loss, outputs = mnist_classifier(), "cross_entropy", 10
            else:
                model, loss, outputs = DeepAutoencoder(sparse=False), "sigmoid_cross_entropy", 784
            cm = kronograph.compile(model, (xs[0][:2],), loss=loss)
            settings = dict(n1=batch, n2=n2)
            sgd = seconds_per_step("sgd", cm, xs, ys)
            row = [model_name, str(n2), str(batch), f"{1000 * sgd:.1f}"]
            for name in ("smw-ng", "smw-ng-bd", "smw-gn"):
                if name == "smw-gn" and outputs > 10:
                    row.append("not run")
                    continue
                t = seconds_per_step(name, cm, xs, ys, **settings)
                row.append(f"{1000 * t:.0f} ({t / sgd:.1f}x)")
            row += [size(4 * n2 ** 2), size(4 * (n2 * outputs) ** 2)]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
