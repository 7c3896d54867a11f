"""The Triton kernels of triton_kernels/ beside the torch way of doing the same work (issue 15), on a CUDA GPU.

    python benchmarks/kernels.py [--sizes autoencoder,resnet50,bert] [--kernels statistics,conv,inverse,update]
                                 [--repeats 20] [--warmup 3] [--dtype float32] [--out benchmarks/results/kernels.json]

What it measures, per kernel and per layer shape (batched over the layers of one shape, as the kernels are), the
median time of ``--repeats`` calls after ``--warmup`` ones (CUDA events around each call, so Python launch costs
count), the achieved TFLOP/s (FLOP counts written beside each way, below) and the GB/s of the compulsory traffic
(each operand read once, each result written once: the figure to read where a case is memory-bound), beside:

* statistics (``factor_update_``, out <- beta out + alpha X~^T X~): a cuBLAS ``torch.baddbmm`` of the same shape on
  half the output columns (the kernel computes one triangle: the same work), torch's X~^T X~ (``bmm``) followed by a
  separate EMA, and the runtime's ``accumulate_grams`` (runtime/factors.py);
* conv statistics (``conv_factor_update_``, implicit patches): F.unfold + bmm (the kernel's torch reference) and
  F.unfold + ``accumulate_grams`` (the runtime's way);
* damped inversion (``damped_inverse_ns``: Newton-Schulz warm-started from the exact inverse of the factor before
  a small EMA step, ``--perturbation``): the same iteration cold-started and on torch matmuls, torch.linalg.cholesky
  + cholesky_inverse, the runtime's ``damped_inverse`` (cholesky_ex, NaN-safe) and eigh (cuSOLVER);
* the fused update (``fused_update`` of triton_kernels/update.py): two torch matmuls plus the
  separate epilogue (delta = scale G^-1 V A^-1 + momentum previous + weight_decay param; param += lr delta).

The runtime's calls run inside ``forced_backend("torch")``: on CUDA the runtime itself picks the kernels, and
these rows are its torch code.

Sizes: the MNIST autoencoder (784-1000-500-250-30 and mirror, batch 512), a ResNet-50's convolutions (3x3 64->64
at 56x56, 3x3 256->256 at 14x14, 1x1 1024->256 at 14x14, batch 32) and a BERT-base layer (Q, K, V, O 768->768,
FFN 768->3072->768, 512 tokens x batch 8).

Targets (printed beside the figures, met or missed): statistics kernel / half-columns baddbmm <= 1.2, and faster
than X^T X + EMA; conv statistics at least 2x faster than the faster unfold way; Newton-Schulz (warm) faster than
cholesky + cholesky_inverse and than eigh; the fused update faster than two matmuls + epilogue. Each kernel's
result is also compared once with the torch way (the "check" column: max |difference| / max |torch result|).

On the GPU machine: ``python benchmarks/kernels.py`` (all sizes, all kernels; a few minutes by estimate, most of it
Triton's compilations in the warm-up); it prints the device, Markdown tables and writes the JSON to ``--out``.
Without CUDA it runs the torch ways only (never Triton's interpreter) and says the GPU figures are pending;
``--smoke`` cuts the repeats to 2 (after 1 warm-up) and writes no JSON unless ``--out`` is given, so that a CPU
check does not overwrite the GPU figures.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from kronograph.runtime.factors import accumulate_grams
from kronograph.runtime.inverse import damped_inverse
from kronograph.triton_kernels.conv_statistics import conv_factor_update_, conv_factor_update_reference
from kronograph.triton_kernels.dispatch import forced_backend, interpreting, triton_available
from kronograph.triton_kernels.inverse import damped_inverse_ns, newton_schulz
from kronograph.triton_kernels.statistics import factor_update_, factor_update_reference
from kronograph.triton_kernels.update import fused_update

NO_CUDA = "no CUDA device: GPU figures pending; CPU figures of the torch references are not kernel timings"
SIZES = ("autoencoder", "resnet50", "bert")
KERNELS = ("statistics", "conv", "inverse", "update")
DECAY = 0.95  # the factors' EMA decay: beta of the statistics, alpha = (1 - decay) / m
F32 = 4  # bytes of a float32


# -- the layer shapes ----------------------------------------------------------------------------------------
@dataclass
class Linear:
    inp: int
    out: int
    bias: bool = True


@dataclass
class Conv:
    name: str
    channels: int
    out: int
    size: int  # square input feature map, stride 1, "same" padding
    kernel: int
    bias: bool = False


@dataclass
class SizeSet:
    name: str
    rows: int  # rows of a linear layer's statistics: examples (x positions)
    linears: list[Linear] = field(default_factory=list)
    batch: int = 0  # examples of a conv input
    convs: list[Conv] = field(default_factory=list)


def size_set(name: str) -> SizeSet:
    if name == "autoencoder":  # the K-FAC paper's MNIST autoencoder, batch 512
        widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
        return SizeSet(name, 512, [Linear(i, o) for i, o in zip(widths, widths[1:])])
    if name == "resnet50":  # three of ResNet-50's convolutions, batch 32 (no bias: batch norm follows)
        return SizeSet(name, 0, batch=32, convs=[Conv("3x3 64->64 @56", 64, 64, 56, 3),
                                                  Conv("3x3 256->256 @14", 256, 256, 14, 3),
                                                  Conv("1x1 1024->256 @14", 1024, 256, 14, 1)])
    if name == "bert":  # one BERT-base layer: Q, K, V, O, FFN in and out; 512 tokens x batch 8 rows
        return SizeSet(name, 512 * 8, [Linear(768, 768)] * 4 + [Linear(768, 3072), Linear(3072, 768)])
    raise ValueError(f"unknown size set {name!r}; choose from {', '.join(SIZES)}")


def statistics_cases(s: SizeSet) -> list[tuple[str, int, bool, int, int]]:
    """(label, width d of the rows, homogeneous, groups, rows R): the factors of one shape stacked as groups.
    A conv's A factor is the conv kernel's; its G factor (output-gradient rows) is this kernel's."""
    shapes = Counter()
    for layer in s.linears:
        shapes[("A", layer.inp, layer.bias, s.rows)] += 1
        shapes[("G", layer.out, False, s.rows)] += 1
    for conv in s.convs:
        shapes[("G", conv.out, False, s.batch * conv.size * conv.size)] += 1
    return [(f"{kind} {d + hom}{f' x{n}' if n > 1 else ''}, R {rows}", d, hom, n, rows)
            for (kind, d, hom, rows), n in shapes.items()]


def inverse_cases(s: SizeSet) -> list[tuple[str, int, int]]:
    """(label, factor size D, groups): every A and G factor, stacked by size."""
    sizes = Counter()
    for layer in s.linears:
        sizes[("A", layer.inp + layer.bias)] += 1
        sizes[("G", layer.out)] += 1
    for conv in s.convs:
        sizes[("A", conv.channels * conv.kernel ** 2 + conv.bias)] += 1
        sizes[("G", conv.out)] += 1
    return [(f"{kind} {d}{f' x{n}' if n > 1 else ''}", d, n) for (kind, d), n in sizes.items()]


def update_cases(s: SizeSet) -> list[tuple[str, int, int, int]]:
    """(label, out, in, groups): the weight (with its bias column) of every layer, stacked by shape."""
    shapes = Counter()
    for layer in s.linears:
        shapes[(layer.out, layer.inp + layer.bias)] += 1
    for conv in s.convs:
        shapes[(conv.out, conv.channels * conv.kernel ** 2 + conv.bias)] += 1
    return [(f"{o}x{i}{f' x{n}' if n > 1 else ''}", o, i, n) for (o, i), n in shapes.items()]


# -- timing ---------------------------------------------------------------------------------------------------
@dataclass
class Way:
    key: str
    label: str
    fn: Callable[[], object]
    flops: float  # the FLOP this way performs (its count is commented where the way is made)
    kernel: bool = False  # a Triton kernel: timed only on a CUDA device, never in the interpreter
    skip: str = ""  # why it is not run at all (printed once, recorded in the JSON)


def on_torch(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with every backend="auto" choice inside it (the runtime's calls) held to the torch code."""
    def run():
        with forced_backend("torch"):
            return fn()

    return run


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int, cuda: bool) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones: CUDA events around every call on a
    GPU (launch gaps included), perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


@dataclass
class Case:
    family: str
    size_set: str
    label: str
    bytes: float  # compulsory traffic: operands read once, results written once
    ways: list[Way]
    notes: list[str] = field(default_factory=list)
    check: Callable[[], float] | None = None  # max |kernel - torch| / max |torch|, run once on a GPU
    results: dict = field(default_factory=dict)
    check_value: float | None = None


def run_case(case: Case, args, kernels: bool) -> None:
    """Times every way of the case (the kernels only when ``kernels``), recording errors instead of raising."""
    for way in case.ways:
        if way.skip:
            case.results[way.key] = {"skipped": way.skip}
            continue
        if way.kernel and not kernels:
            case.results[way.key] = {"pending": True}
            continue
        try:
            times = median_seconds(way.fn, args.repeats, args.warmup, args.cuda)
        except Exception as error:  # noqa: BLE001 - one failing way must not lose the run's other figures
            case.results[way.key] = {"error": describe(error)}
            if args.cuda:
                torch.cuda.synchronize()
            continue
        seconds = statistics.median(times)
        case.results[way.key] = {"seconds": seconds, "times": times, "flops": way.flops,
                                 "tflops": way.flops / seconds / 1e12, "gbs": case.bytes / seconds / 1e9}
    if kernels and case.check is not None:
        try:
            case.check_value = float(case.check())
        except Exception as error:  # noqa: BLE001
            case.notes.append(f"check failed: {describe(error)}")


def finite(value):
    """``value`` with every NaN or infinite float replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def relative_difference(kernel: torch.Tensor, torch_way: torch.Tensor) -> float:
    reference = torch_way.double()
    return float((kernel.double() - reference).abs().max() / reference.abs().max().clamp_min(1e-300))


def gram_flops(rows: int, d: int, panels: int = 4, min_size: int = 256) -> float:
    """FLOP of ``accumulate_grams`` for one group: its panels' baddbmm, block-rows right of the diagonal."""
    k = panels if d >= min_size else 1
    edges = [round(i * d / k) for i in range(k + 1)]
    return sum(2.0 * rows * (end - begin) * (d - begin) for begin, end in zip(edges, edges[1:]))


# -- the four families --------------------------------------------------------------------------------------------
def statistics_case(s: SizeSet, label, d, hom, groups, rows, device, dtype) -> Case:
    D = d + hom
    x = torch.randn(groups, rows, d, device=device).to(dtype)
    alpha, beta = (1 - DECAY) / rows, DECAY
    out_k, out_t, out_r = (torch.eye(D, device=device).repeat(groups, 1, 1) for _ in range(3))
    full = torch.cat([x, x.new_ones(groups, rows, 1)], dim=2) if hom else x  # X~, made once for the GEMM bound
    half = (D + 1) // 2
    out_half = torch.zeros(groups, D, half, device=device, dtype=dtype)  # baddbmm's out is in the operands' dtype

    def kernel():
        factor_update_(out_k, x, alpha, beta, hom, backend="triton")

    def half_gemm():  # the GEMM bound: X~^T (D x R) times half of X~'s columns (R x D/2)
        out_half.baddbmm_(full.transpose(1, 2), full[:, :, :half], beta=beta, alpha=alpha)

    def xtx_ema():  # the plain torch way: the ones column concatenated, a full Gram, then the EMA as its own pass
        xt = torch.cat([x, x.new_ones(groups, rows, 1)], dim=2) if hom else x
        out_t.mul_(beta).add_(torch.bmm(xt.transpose(1, 2), xt), alpha=alpha)

    def runtime():  # runtime/factors.py: rows in the factor's dtype, ones column, panels of baddbmm, mirror
        xr = x.float()
        if hom:
            xr = torch.cat([xr, xr.new_ones(groups, rows, 1)], dim=2)
        accumulate_grams(out_r, [xr], alpha, beta)

    def check():
        fresh = torch.empty(groups, D, D, device=device)
        kernel_result = factor_update_(fresh, x, 1.0 / rows, 0.0, hom, backend="triton")
        return relative_difference(kernel_result, factor_update_reference(
            torch.empty(groups, D, D, device=device, dtype=torch.float64), x.double(), 1.0 / rows, 0.0, hom))

    ways = [
        # D (D + 1) / 2 dot products of length R (the triangle, diagonal included), 2 FLOP per multiply-add
        Way("kernel", "Triton", kernel, groups * rows * D * (D + 1.0), kernel=True),
        # a D x R by R x ceil(D/2) GEMM
        Way("half", "cuBLAS baddbmm, half the columns", half_gemm, groups * 2.0 * rows * D * half),
        # the full D x D Gram (the EMA's 3 D^2 FLOP per group left out)
        Way("xtx", "X^T X + EMA", xtx_ema, groups * 2.0 * rows * D * D),
        # its panels only: (k + 1) / 2k of the full Gram for D >= 256 (k = 4)
        Way("runtime", "accumulate_grams", on_torch(runtime), groups * gram_flops(rows, D)),
    ]
    # rows read once, the factor read and written once (float32)
    traffic = groups * (rows * d * x.element_size() + 2.0 * D * D * F32)
    return Case("statistics", s.name, label, traffic, ways, check=check)


def conv_case(s: SizeSet, conv: Conv, device, dtype) -> Case:
    n, c, k, size = s.batch, conv.channels, conv.kernel, conv.size
    pad = k // 2
    x = torch.randn(n, c, size, size, device=device).to(dtype)
    D = c * k * k + conv.bias
    rows = n * size * size  # stride 1, "same" padding: one row per (example, pixel)
    alpha, beta = (1 - DECAY) / n, DECAY
    out_k, out_u, out_r = (torch.eye(D, device=device)[None].clone() for _ in range(3))
    geometry = dict(kernel_size=k, stride=1, padding=pad, homogeneous=conv.bias)

    def kernel():
        conv_factor_update_(out_k, x, alpha=alpha, beta=beta, backend="triton", **geometry)

    def unfold_bmm():  # the kernel's torch reference: F.unfold (float32), bmm, symmetric epilogue
        conv_factor_update_reference(out_u, x, alpha=alpha, beta=beta, **geometry)

    def unfold_runtime():  # the runtime's way: conv_patches (F.unfold, rows copied out) + accumulate_grams
        p = F.unfold(x.float(), k, padding=pad).transpose(1, 2).reshape(1, rows, c * k * k)
        if conv.bias:
            p = torch.cat([p, p.new_ones(1, rows, 1)], dim=2)
        accumulate_grams(out_r, [p], alpha, beta)

    def check():
        fresh_k, fresh_t = torch.empty(1, D, D, device=device), torch.empty(1, D, D, device=device)
        conv_factor_update_(fresh_k, x, alpha=1.0 / n, beta=0.0, backend="triton", **geometry)
        conv_factor_update_reference(fresh_t, x, alpha=1.0 / n, beta=0.0, **geometry)
        return relative_difference(fresh_k, fresh_t)

    ways = [
        # the triangle of the Gram of the implicit patch rows: D (D + 1) / 2 dot products of length rows
        Way("kernel", "Triton (implicit patches)", kernel, rows * D * (D + 1.0), kernel=True),
        # the full Gram of the unfold tensor [rows, D]
        Way("unfold_bmm", "unfold + bmm", unfold_bmm, 2.0 * rows * D * D),
        # accumulate_grams' panels of the same Gram
        Way("unfold_runtime", "unfold + accumulate_grams", on_torch(unfold_runtime), gram_flops(rows, D)),
    ]
    traffic = x.numel() * x.element_size() + 2.0 * D * D * F32  # the feature map read once, the factor read + written
    return Case("conv", s.name, conv.name, traffic, ways, check=check)


def spd_factor(groups: int, d: int, samples: int, device) -> torch.Tensor:
    """[groups, d, d] Grams of ``samples`` Gaussian rows whose columns are scaled over a decade (eigenvalues over
    about three decades, full rank when samples > d), as a factor's EMA over many batches is."""
    scale = torch.logspace(0, -1, d, device=device)
    x = torch.randn(groups, samples, d, device=device) * scale
    return x.transpose(1, 2) @ x / samples


def inverse_case(s: SizeSet, label, d, groups, device, args) -> Case:
    previous_factor = spd_factor(groups, d, 2 * d, device)
    # One EMA step of weight ``perturbation`` towards a batch's Gram: the factor the previous inverse is of, moved.
    m = (1 - args.perturbation) * previous_factor + args.perturbation * spd_factor(groups, d, max(d // 2, 1), device)
    damping = args.damping * m.diagonal(dim1=-2, dim2=-1).mean(-1)  # per group, relative to the mean eigenvalue
    previous, _ = on_torch(lambda: damped_inverse(previous_factor, damping))()  # Cholesky's, before the step
    del previous_factor
    eye = torch.eye(d, device=device)

    def cholesky():
        factor = torch.linalg.cholesky(m + damping[:, None, None] * eye)
        return torch.cholesky_inverse(factor)

    def eigh():
        values, vectors = torch.linalg.eigh(m)
        return (vectors / (values + damping[:, None])[:, None, :]) @ vectors.transpose(1, 2)

    def ns_flops(backend: str, warm: bool) -> tuple[float, str]:
        """FLOP of one damped_inverse_ns call from its iteration counts, and a note on them."""
        result = newton_schulz(m, damping, previous if warm else None, backend=backend)
        steps = result.iterations.tolist()
        fallbacks = int((~result.converged).sum())
        # 2 d^3 per group for the warm start's residual, 2 x 2 d^3 per step and group, d^3 per Cholesky fallback
        flops = d ** 3 * (2.0 * groups * warm + 4.0 * sum(steps) + fallbacks)
        note = (f"{backend} NS {'warm' if warm else 'cold'}: warm start taken by {int(result.warm.sum())}/{groups}, "
                f"steps {min(steps)}-{max(steps)}, {fallbacks} Cholesky fallback(s)")
        return flops, note

    notes = []
    flops = {}
    for backend, warm, needs_gpu in (("triton", True, True), ("triton", False, True), ("torch", True, False)):
        if needs_gpu and not args.run_kernels:
            continue
        try:
            flops[backend, warm], note = ns_flops(backend, warm)
            notes.append(note)
        except Exception as error:  # noqa: BLE001 - the timing records the same error
            flops[backend, warm] = math.nan
            notes.append(f"{backend} NS {'warm' if warm else 'cold'}: {type(error).__name__}")

    def check():
        inverse, _ = damped_inverse_ns(m, damping, previous, backend="triton")
        exact = torch.linalg.inv((m + damping[:, None, None] * eye).double())
        return relative_difference(inverse, exact)

    ways = [  # the Newton-Schulz FLOP from each backend's iteration counts on this case (ns_flops above)
        Way("kernel", "Triton NS, warm", lambda: damped_inverse_ns(m, damping, previous, backend="triton"),
            flops.get(("triton", True), math.nan), kernel=True),
        Way("cold", "Triton NS, cold", lambda: damped_inverse_ns(m, damping, backend="triton"),
            flops.get(("triton", False), math.nan), kernel=True),
        Way("ns_torch", "NS warm, torch matmuls", lambda: damped_inverse_ns(m, damping, previous, backend="torch"),
            flops.get(("torch", True), math.nan)),
        # potrf d^3 / 3 + potri 2 d^3 / 3 per group
        Way("cholesky", "cholesky + cholesky_inverse", cholesky, groups * 1.0 * d ** 3),
        # the same potrf + potri d^3, inside the runtime's finiteness checks and float64 retry
        Way("runtime", "runtime damped_inverse (Cholesky)", on_torch(lambda: damped_inverse(m, damping)),
            groups * 1.0 * d ** 3),
        # ~9 d^3 for eigh with vectors (Golub & Van Loan's count) + 2 d^3 for V diag(1 / (l + damping)) V^T
        Way("eigh", "eigh", eigh, groups * 11.0 * d ** 3),
    ]
    traffic = groups * 2.0 * d * d * F32  # the factor read, the inverse written (the previous one read by NS too)
    return Case("inverse", s.name, label, traffic, ways, notes=notes, check=check)


def update_case(s: SizeSet, label, out, inp, groups, device) -> Case:
    g_inv = torch.randn(groups, out, out, device=device) / math.sqrt(out)
    a_inv = torch.randn(groups, inp, inp, device=device) / math.sqrt(inp)
    v = torch.randn(groups, out, inp, device=device)
    settings = dict(scale=0.5, momentum=0.9, weight_decay=1e-4, lr=-1e-3)
    prev_k, param_k = torch.randn(groups, out, inp, device=device), torch.randn(groups, out, inp, device=device)
    prev_t, param_t = prev_k.clone(), param_k.clone()

    def kernel():
        fused_update(g_inv, v, a_inv, previous=prev_k, param=param_k, backend="triton", **settings)

    def two_matmuls(previous=prev_t, param=param_t):
        delta = torch.matmul(g_inv, torch.matmul(v, a_inv))  # two GEMMs
        delta.mul_(settings["scale"]).add_(previous, alpha=settings["momentum"])  # then the epilogue, pass by pass
        delta.add_(param, alpha=settings["weight_decay"])
        param.add_(delta, alpha=settings["lr"])
        previous.copy_(delta)
        return delta

    def check():
        p0, w0 = torch.randn_like(v), torch.randn_like(v)
        p1, w1 = p0.clone(), w0.clone()
        delta = fused_update(g_inv, v, a_inv, previous=p0, param=w0, backend="triton", **settings)
        wanted = two_matmuls(p1, w1)
        return max(relative_difference(delta, wanted), relative_difference(w0, w1))

    # G^-1 (V A^-1): 2 out in^2 + 2 out^2 in per group (the epilogue's 5 FLOP per entry left out)
    flops = groups * 2.0 * (out * inp * inp + out * out * inp)
    ways = [Way("kernel", "Triton fused", kernel, flops, kernel=True),
            Way("torch", "2 matmuls + epilogue", two_matmuls, flops)]
    # the two inverses and V read, previous and param read and written
    traffic = groups * F32 * (out * out + inp * inp + 5.0 * out * inp)
    return Case("update", s.name, label, traffic, ways, check=check)


# -- targets and tables ---------------------------------------------------------------------------------------------
#: family -> [(label, numerator ways (the fastest counts), denominator ways, comparison, bound)]: ratio of times
TARGETS = {
    "statistics": [("kernel / half-GEMM <= 1.2", ("kernel",), ("half",), "<=", 1.2),
                   ("(X^T X + EMA) / kernel > 1", ("xtx",), ("kernel",), ">", 1.0)],
    "conv": [("unfold / kernel >= 2", ("unfold_bmm", "unfold_runtime"), ("kernel",), ">=", 2.0)],
    "inverse": [("cholesky / NS > 1", ("cholesky",), ("kernel",), ">", 1.0),
                ("eigh / NS > 1", ("eigh",), ("kernel",), ">", 1.0)],
    "update": [("(2 matmuls + epilogue) / fused > 1", ("torch",), ("kernel",), ">", 1.0)],
}
TITLES = {"statistics": "Factor statistics: out <- beta out + alpha X~^T X~ (factor_update_)",
          "conv": "Conv statistics: KFC A factor from the feature map (conv_factor_update_)",
          "inverse": "Batched damped inversion (damped_inverse_ns)",
          "update": "Fused preconditioned update (fused_update)"}


def seconds_of(case: Case, keys) -> float | None:
    found = [case.results.get(k, {}).get("seconds") for k in keys]
    found = [t for t in found if t is not None]
    return min(found) if found else None


def evaluate(case: Case) -> list[dict]:
    rows = []
    for label, top, bottom, op, bound in TARGETS[case.family]:
        a, b = seconds_of(case, top), seconds_of(case, bottom)
        ratio = None if a is None or b is None else a / b
        met = None if ratio is None else (ratio <= bound if op == "<=" else ratio >= bound if op == ">=" else ratio > bound)
        rows.append({"target": label, "family": case.family, "size_set": case.size_set, "case": case.label,
                     "ratio": ratio, "met": met})
    return rows


def cell(result: dict, *, rate: bool = True) -> str:
    if result.get("pending"):
        return "pending"
    if "skipped" in result:
        return "skipped"
    if "error" in result:
        return "error"
    if "seconds" not in result:
        return "-"
    ms = f"{result['seconds'] * 1e3:.3g}"
    return f"{ms} ({result['tflops']:.3g})" if rate and math.isfinite(result["tflops"]) else ms


def print_family(family: str, cases: list[Case]) -> None:
    ways = cases[0].ways
    print(f"\n### {TITLES[family]}\n")
    header = (["set", "case", "kernel ms", "TFLOP/s", "GB/s"] + [f"{w.label} ms (TFLOP/s)" for w in ways[1:]]
              + [t[0] for t in TARGETS[family]] + ["check", "notes"])
    print("| " + " | ".join(header) + " |")
    print("| --- | --- |" + " ---: |" * (len(header) - 3) + " --- |")
    for case in cases:
        kernel = case.results.get("kernel", {})
        if "seconds" in kernel:
            first = [f"{kernel['seconds'] * 1e3:.3g}", f"{kernel['tflops']:.3g}", f"{kernel['gbs']:.4g}"]
        else:
            first = [cell(kernel), "", ""]
        others = [cell(case.results.get(w.key, {})) for w in ways[1:]]
        targets = []
        for row in evaluate(case):
            if row["ratio"] is None:
                targets.append("pending" if case.results.get("kernel", {}).get("pending") else "-")
            else:
                targets.append(f"{row['ratio']:.2f} {'met' if row['met'] else 'MISSED'}")
        check = "" if case.check_value is None else f"{case.check_value:.1e}"
        errors = [f"{w.label}: {case.results[w.key]['error']}" for w in ways if "error" in case.results.get(w.key, {})]
        notes = "; ".join(case.notes + errors)
        print("| " + " | ".join([case.size_set, case.label, *first, *others, *targets, check, notes]) + " |")


def case_makers(family: str, names: list[str], device, args):
    """(size set, label, maker) of each case of a family, in the order printed; a maker allocates its tensors."""
    for name in names:
        s = size_set(name)
        if family == "statistics":
            for label, d, hom, groups, rows in statistics_cases(s):
                yield name, label, lambda s=s, a=(label, d, hom, groups, rows): statistics_case(
                    s, *a, device, args.row_dtype)
        elif family == "conv":
            for conv in s.convs:
                yield name, conv.name, lambda s=s, conv=conv: conv_case(s, conv, device, args.row_dtype)
        elif family == "inverse":
            for label, d, groups in inverse_cases(s):
                yield name, label, lambda s=s, a=(label, d, groups): inverse_case(s, *a, device, args)
        elif family == "update":
            for label, out, inp, groups in update_cases(s):
                yield name, label, lambda s=s, a=(label, out, inp, groups): update_case(s, *a, device)


def describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def write_json(args, header: dict, done: dict[str, list[Case]]) -> None:
    if not args.out:
        return
    record = {**header, "cuda_device": args.cuda, "smoke": args.smoke, "note": None if args.cuda else NO_CUDA,
              "families": {family: [{"size_set": c.size_set, "case": c.label, "bytes": c.bytes, "notes": c.notes,
                                     "check": c.check_value,
                                     "ways": {w.key: {"label": w.label, **c.results.get(w.key, {})} for w in c.ways}}
                                    for c in cases]
                           for family, cases in done.items()},
              "targets": [row for cases in done.values() for case in cases for row in evaluate(case)]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(finite(record), indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {', '.join(KERNELS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per way (median): 20, 2 with --smoke")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first: 3, 1 with --smoke")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the statistics' rows and the conv input (factors, inverses and the update are float32; "
                             "the cuBLAS bound and X^T X multiply in this dtype, the runtime's ways in float32)")
    parser.add_argument("--perturbation", type=float, default=1e-3,
                        help="weight of the EMA step between the previous inverse's factor and the one inverted")
    parser.add_argument("--damping", type=float, default=1e-3, help="damping relative to the factor's mean eigenvalue")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch's default when not given)")
    parser.add_argument("--smoke", action="store_true", help="tiny repeat counts; no JSON unless --out is given")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels.json, none with "
                                                    "--smoke)")
    args = parser.parse_args()
    names = [n for n in args.sizes.split(",") if n]
    kernels = [k for k in args.kernels.split(",") if k]
    for name in names:
        size_set(name)
    if unknown := set(kernels) - set(KERNELS):
        parser.error(f"unknown kernels {sorted(unknown)}; choose from {', '.join(KERNELS)}")
    args.repeats = args.repeats if args.repeats is not None else 2 if args.smoke else 20
    args.warmup = args.warmup if args.warmup is not None else 1 if args.smoke else 3
    if args.out is None and not args.smoke:
        args.out = str(Path(__file__).parent / "results" / "kernels.json")
    args.row_dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    args.cuda = torch.cuda.is_available()
    device = torch.device("cuda" if args.cuda else "cpu")
    args.run_kernels = args.cuda and triton_available() and not interpreting()
    header = {"torch": torch.__version__, "repeats": args.repeats, "warmup": args.warmup, "dtype": args.dtype,
              "perturbation": args.perturbation, "damping": args.damping, "sizes": names, "kernels": kernels}
    if args.cuda:
        import triton  # noqa: F401 - only for its version; triton_available() said whether it imports

        props = torch.cuda.get_device_properties(device)
        header |= {"device": torch.cuda.get_device_name(device), "sms": props.multi_processor_count,
                   "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                   "triton": triton.__version__ if triton_available() else None,
                   "tf32": torch.backends.cuda.matmul.allow_tf32}
        print(f"device: {header['device']} ({props.multi_processor_count} SMs, capability {header['capability']}), "
              f"CUDA {torch.version.cuda}, torch {torch.__version__}, triton {header['triton']}, TF32 matmuls "
              f"{'on' if header['tf32'] else 'off'}")
        if not args.run_kernels:
            print("Triton kernels not timed: " + ("TRITON_INTERPRET is set (interpreter)" if interpreting()
                                                 else "triton does not import"))
    else:
        header |= {"device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}
        print(NO_CUDA)
        print(f"device: {header['device']}, torch {torch.__version__}")
    print(f"median of {args.repeats} calls after {args.warmup} warm-up calls; {args.dtype} rows; "
          f"cells: ms (TFLOP/s); ratios are of times; check: max |kernel - torch| / max |torch|")

    start = time.perf_counter()
    done: dict[str, list[Case]] = {}
    for family in kernels:
        for name, label, make in case_makers(family, names, device, args):
            began = time.perf_counter()
            try:
                case = make()
            except Exception as error:  # noqa: BLE001 - e.g. out of memory: the other cases still run
                print(f"[{family}] {name} {label}: not set up: {describe(error)}", file=sys.stderr, flush=True)
                continue
            run_case(case, args, args.run_kernels)
            for way in case.ways:
                way.fn = None  # drop the closures: the case's tensors go with them
            case.check = None
            done.setdefault(family, []).append(case)
            del case
            if args.cuda:
                torch.cuda.empty_cache()
            print(f"[{family}] {name} {label}: {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
        if family in done:
            print_family(family, done[family])
            sys.stdout.flush()
            write_json(args, header, done)  # after every family: a run cut short keeps what it measured

    targets = [row for cases in done.values() for case in cases for row in evaluate(case)]
    print("\n### Targets\n")
    print("| target | met | missed | pending |")
    print("| --- | ---: | ---: | ---: |")
    for label in dict.fromkeys(row["target"] for row in targets):
        mine = [row for row in targets if row["target"] == label]
        print(f"| {label} | {sum(r['met'] is True for r in mine)} | {sum(r['met'] is False for r in mine)} | "
              f"{sum(r['met'] is None for r in mine)} |")
    print(f"\n{time.perf_counter() - start:.0f} s in all")

    if args.out:
        write_json(args, header, done)
        print(f"wrote {args.out}")
    else:
        print("smoke run: no JSON written (pass --out to write one)")


if __name__ == "__main__":
    main()
