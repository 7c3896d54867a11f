"""Step cost of K-FAC relative to an SGD step on the K-FAC paper's MNIST autoencoder (issue 4's workload).

    python benchmarks/kfac_overhead.py [--threads 2] [--batch 512] [--steps 60] [--device cuda] [--backend torch]

Every figure is a ratio to an SGD step measured in the same process, on the same model and batches:
784-1000-500-250-30-250-500-1000-784, float32. Configurations:
- peer: empirical Fisher, statistics on the whole batch every step, inverses every 20, no re-scaling (what
  kfac-pytorch, ASDL and BackPACK users run);
- paper: ``KFAC(cm, preset="paper")`` (tau_1 = 1/8, tau_2 = 1/4, MC Fisher, re-scaling, qmodel momentum, adaptive
  lambda and gamma);
- default: ``KFAC(cm)``, the first-try preset;
- K-BFGS and K-BFGS(L): ``KBFGS(cm)`` and ``KBFGSL(cm)`` with the thesis's defaults (curvature every step, T = 1);
- TNT and Shampoo: ``TNT(cm)`` and ``Shampoo(cm)`` with the thesis's autoencoder defaults (statistics every step,
  inverses every 20; BENCHMARKS.md's first TNT and Shampoo table was at its CNN set-up, 10 and 100).
kfac-pytorch is measured beside when it is importable (it is not on the package index: install it from its
repository with `pip install --no-deps <checkout>`). Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import kronograph
from kronograph.cli.builtins import DeepAutoencoder
from kronograph.cli.datasets import load_dataset
from kronograph.errors import KronographError
from kronograph.triton_kernels.dispatch import BACKENDS, forced_backend

PEER = dict(preset="paper", fisher="empirical", stats_fraction=1.0, stats_every=1, inverse_every=20,
            rescale=False, momentum=0.9, lr=1e-3, factor_damping=1e-3)
PAPER = dict(preset="paper")  # the figures in BENCHMARKS.md were measured with these settings as KFAC's defaults


def batches(x: torch.Tensor, size: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [x[torch.randint(0, len(x), (size,), generator=generator)] for _ in range(count)]


def loss_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(model(x), x, reduction="none").sum(1).mean()


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return DeepAutoencoder().to(DEVICE)


#: Where the models and batches live (``--device``); on CUDA the clock waits for the GPU at both ends.
DEVICE = torch.device("cpu")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def mnist_batches(size: int, count: int) -> tuple[list[torch.Tensor], str]:
    """``count`` random batches of MNIST train images (uniform noise when MNIST is not installed)."""
    try:
        x, source = torch.from_numpy(load_dataset("mnist", "train").x), "MNIST train"
    except KronographError:
        x, source = torch.rand(10000, 784), "uniform noise (MNIST not installed)"
    return [batch.to(DEVICE) for batch in batches(x, size, count)], source


def timed(step, data: list[torch.Tensor], warmup: int, on_start=None) -> float:
    """Seconds per ``step(x)`` over the batches after the first ``warmup`` (``on_start()`` runs when the clock
    starts)."""
    for i, x in enumerate(data):
        if i == warmup:
            synchronize()
            if on_start is not None:
                on_start()
            start = time.perf_counter()
        step(x)
    synchronize()
    return (time.perf_counter() - start) / (len(data) - warmup)


def time_sgd(data: list[torch.Tensor], warmup: int) -> float:
    model = fresh_model()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    def step(x: torch.Tensor) -> None:
        sgd.zero_grad()
        loss_of(model, x).backward()
        sgd.step()

    return timed(step, data, warmup)


def state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def time_kronograph(data: list[torch.Tensor], warmup: int, settings: dict,
                    method: type = kronograph.optim.KFAC) -> tuple[float, dict[str, float], int]:
    model = fresh_model()
    optimizer = method(kronograph.compile(model, (data[0][:8],), loss="sigmoid_cross_entropy"), seed=0, **settings)
    timings = getattr(optimizer, "timings", {})  # K-FAC's seconds per phase
    per_step = timed(lambda x: optimizer.step(x, x), data, warmup, on_start=timings.clear)
    steps = len(data) - warmup
    phases = {phase: seconds / steps for phase, seconds in timings.items()}
    return per_step, phases, state_bytes(optimizer.state_dict())


def time_kfac_pytorch(data: list[torch.Tensor], warmup: int, method: str) -> float | None:
    try:
        from kfac.preconditioner import KFACPreconditioner
    except ImportError:
        return None
    model = fresh_model()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    preconditioner = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=20, compute_method=method,
                                        damping=1e-3, lr=1e-3, loglevel=0)

    def step(x: torch.Tensor) -> None:
        sgd.zero_grad()
        loss_of(model, x).backward()
        preconditioner.step()
        sgd.step()

    return timed(step, data, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the models and batches live")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="the runtime's kernels: auto (dispatch.AUTO_ON_CUDA), triton or torch (triton_kernels/dispatch.py)")
    args = parser.parse_args()
    with forced_backend(args.backend):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    data, source = mnist_batches(args.batch, args.warmup + args.steps)

    sgd = time_sgd(data, args.warmup)
    rows = [("SGD (Nesterov)", sgd, {}, 0)]
    optim = kronograph.optim
    for name, settings, method in (("kronograph, peer configuration", PEER, optim.KFAC),
                                   ("kronograph, paper configuration", PAPER, optim.KFAC),
                                   ("kronograph, KFAC(cm) default", {}, optim.KFAC),
                                   ("kronograph, KBFGS(cm)", {}, optim.KBFGS),
                                   ("kronograph, KBFGSL(cm)", {}, optim.KBFGSL),
                                   ("kronograph, TNT(cm)", {}, optim.TNT),
                                   ("kronograph, Shampoo(cm)", {}, optim.Shampoo)):
        per_step, phases, memory = time_kronograph(data, args.warmup, settings, method)
        rows.append((name, per_step, phases, memory))
    for method in ("inverse", "eigen"):
        measured = time_kfac_pytorch(data, args.warmup, method)
        if measured is not None:
            rows.append((f"kfac-pytorch ({method}), same schedule", measured, {}, 0))

    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else platform.processor() or platform.machine()
    print(f"{source}, batch {args.batch}, {args.threads} threads, torch {torch.__version__}, "
          f"{where}, kernels {args.backend}; {args.steps} steps after {args.warmup} warm-up steps\n")
    print("| optimizer | ms/step | x SGD | breakdown (x SGD) | optimizer state |")
    print("| --- | ---: | ---: | --- | ---: |")
    for name, per_step, phases, memory in rows:
        breakdown = ", ".join(f"{phase} {seconds / sgd:.2f}" for phase, seconds in sorted(phases.items()))
        state = f"{memory / 2**20:.1f} MiB" if memory else ""
        print(f"| {name} | {per_step * 1e3:.1f} | {per_step / sgd:.2f} | {breakdown} | {state} |")


if __name__ == "__main__":
    main()
