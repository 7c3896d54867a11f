"""Step time of the onnxruntime engine against the torch engine on the same model (issue 6's workload).

    python benchmarks/onnxruntime_engine.py [--threads 2] [--batch 512] [--steps 30]

The paper's MNIST autoencoder (784-1000-500-250-30-250-500-1000-784, sigmoid cross-entropy), exported
to .onnx by kronograph and run by both engines from the same weights and batches, float32. Rows:
- forward + backward: the torch module's loss.backward() against one onnxruntime-training step
  without taps (the plan's layers removed) and with every site's activation and gradient tap (the cost
  of the extra statistics outputs);
- K-FAC, peer configuration (empirical Fisher, statistics every step, inverses every 20, no re-scaling)
  and the paper configuration (``KFAC(cm, preset="paper")``) on both engines.
Every figure is also given as a ratio to the torch engine's. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
from pathlib import Path

import torch

import kronograph
from kfac_overhead import PAPER, PEER, mnist_batches, timed  # the same workload and clock as the step-cost benchmark
from kronograph.cli.builtins import DeepAutoencoder
from kronograph.compiler.compiled import CompiledModel
from kronograph.runtime.engines import OnnxRuntimeEngine
from kronograph.runtime.losses import get_loss


def compiled_pair(workdir: Path) -> tuple[CompiledModel, CompiledModel]:
    """The autoencoder on the torch engine and its exported .onnx on onnxruntime, same weights."""
    torch.manual_seed(0)
    module = DeepAutoencoder()
    cm_torch = kronograph.compile(module, (torch.rand(8, 784),), loss="sigmoid_cross_entropy")
    path = cm_torch.export_onnx(workdir / "autoencoder.onnx")
    return cm_torch, kronograph.compile(str(path), loss="sigmoid_cross_entropy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data, source = mnist_batches(args.batch, args.warmup + args.steps)
    loss = get_loss("sigmoid_cross_entropy")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        cm_torch, cm_onnx = compiled_pair(workdir)

        def torch_pass(x: torch.Tensor) -> None:
            cm_torch.module.zero_grad(set_to_none=True)
            loss(cm_torch.module(x), x).backward()

        untapped = CompiledModel(engine="onnxruntime", plan=dataclasses.replace(cm_onnx.plan, layers=()),
                                 graph=cm_onnx.graph, loss=cm_onnx.loss)
        plain = OnnxRuntimeEngine(untapped, workdir / "plain")
        tapped = cm_onnx.onnxruntime(workdir / "tapped")
        base = timed(torch_pass, data, args.warmup)
        rows.append(("forward + backward", base,
                     timed(lambda x: plain.forward_backward([x.numpy()], x.numpy()), data, args.warmup),
                     timed(lambda x: tapped.forward_backward([x.numpy()], x.numpy()), data, args.warmup)))
        for name, settings in (("K-FAC, peer configuration", PEER), ("K-FAC, paper configuration", PAPER)):
            cm_torch, cm_onnx = compiled_pair(workdir / name.split()[-2])
            cm_onnx.onnxruntime(workdir / name.split()[-2] / "artifacts")
            on_torch = kronograph.optim.KFAC(cm_torch, seed=0, **settings)
            on_onnx = kronograph.optim.KFAC(cm_onnx, seed=0, **settings)
            rows.append((name, timed(lambda x: on_torch.step(x, x), data, args.warmup), None,
                         timed(lambda x: on_onnx.step(x.numpy(), x.numpy()), data, args.warmup)))

    print(f"{source}, batch {args.batch}, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; {args.steps} steps after {args.warmup} warm-up steps\n")
    print("| what | torch engine ms | onnxruntime, no taps ms | onnxruntime ms | onnxruntime / torch |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, on_torch, untapped_time, on_onnx in rows:
        plain_cell = "" if untapped_time is None else f"{untapped_time * 1e3:.1f}"
        print(f"| {name} | {on_torch * 1e3:.1f} | {plain_cell} | {on_onnx * 1e3:.1f} | {on_onnx / on_torch:.2f} |")


if __name__ == "__main__":
    main()
