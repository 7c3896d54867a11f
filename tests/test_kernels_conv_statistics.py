"""The implicit-patch KFC A factor (triton_kernels/conv_statistics.py) against float64 patches built here.

The expected factors come from this file's own patches: F.pad + F.unfold for conv2d, Tensor.unfold for
conv1d, in float64, checked first to reproduce F.conv2d / F.conv1d with a random weight (so the oracle's
order and padding are the convolution's). Without CUDA the Triton kernel runs in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1) with blocks of 16, so the shapes are small and none is a
multiple of the blocks; with CUDA the compiled kernel is checked too (``requires_cuda``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kronograph.runtime.capture import Capture
from kronograph.runtime.factors import batch_factors
from kronograph.triton_kernels import conv_statistics as cs
from kronograph.triton_kernels.conv_statistics import (
    conv_factor_update_,
    conv_factor_update_reference,
    conv_factor_update_triton,
    geometry_arguments,
)

from devices import DEVICE, requires_cuda
from plan_helpers import conv_layer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(block_rows=16, block_d=16)  # the interpreter's blocks (tl.dot needs at least 16)

# name, x shape, kernel, stride, padding as passed, (begin, end) pads, dilation, groups, homogeneous
CASES = [
    ("conv2d k3", (2, 3, 6, 6), (3, 3), (1, 1), 0, ((0, 0), (0, 0)), (1, 1), 1, True),
    ("conv2d stride2 pad1", (2, 3, 7, 7), (3, 3), (2, 2), 1, ((1, 1), (1, 1)), (1, 1), 1, False),
    ("conv2d dilation2", (2, 3, 7, 6), (3, 2), (1, 1), (1, 1), ((1, 1), (1, 1)), (2, 2), 1, True),
    ("conv2d groups2", (2, 4, 5, 5), (3, 3), (1, 2), 1, ((1, 1), (1, 1)), (1, 1), 2, True),
    ("conv2d asymmetric pads", (2, 3, 5, 6), (2, 3), (1, 1), (0, 1, 1, 1), ((0, 1), (1, 1)), (1, 1), 1, False),
    ("conv2d 1x1 stride2", (2, 4, 5, 5), (1, 1), (2, 2), 0, ((0, 0), (0, 0)), (1, 1), 1, True),
    ("conv1d stride2 pad2", (2, 3, 9), (3,), (2,), 2, ((2,), (2,)), (1,), 1, True),
    ("conv1d dilation2 groups2", (2, 4, 11), (3,), (1,), (1,), ((1,), (1,)), (2,), 2, False),
]
IDS = [case[0] for case in CASES]


def oracle_patches(x: torch.Tensor, kernel, stride, pads, dilation) -> torch.Tensor:
    """Patch rows [N * T, C * prod(kernel)] in float64, (example, location) order, F.unfold columns."""
    x = x.double().cpu()
    n, c = x.shape[:2]
    begin, end = pads
    if x.dim() == 3:
        k, s, d = kernel[0], stride[0], dilation[0]
        padded = F.pad(x, [begin[0], end[0]])
        windows = padded.unfold(2, d * (k - 1) + 1, s)[..., ::d]  # [N, C, T, k]
        return windows.permute(0, 2, 1, 3).reshape(-1, c * k)
    padded = F.pad(x, [begin[1], end[1], begin[0], end[0]])
    cols = F.unfold(padded, kernel, dilation=dilation, stride=stride)  # [N, C*K, T]
    return cols.transpose(1, 2).reshape(-1, c * math.prod(kernel))


def oracle_factor(x: torch.Tensor, kernel, stride, pads, dilation, groups: int, homogeneous: bool) -> torch.Tensor:
    """sum over rows of p p^T per group, float64 [groups, D, D]."""
    p = oracle_patches(x, kernel, stride, pads, dilation)
    p = p.reshape(p.shape[0], groups, -1).transpose(0, 1)
    if homogeneous:
        p = torch.cat([p, torch.ones(groups, p.shape[1], 1, dtype=p.dtype)], dim=2)
    return p.transpose(1, 2) @ p  # on the CPU: compare with out.cpu()


def make_x(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype=dtype, device=DEVICE)


def dim_of(case) -> tuple[int, int]:
    _, shape, kernel, _, _, _, _, groups, homogeneous = case
    return groups, shape[1] // groups * math.prod(kernel) + homogeneous


def run(fn, out, x, case, **kwargs):
    _, _, kernel, stride, padding, _, dilation, groups, homogeneous = case
    return fn(out, x, kernel, stride, padding, dilation, groups, homogeneous=homogeneous, **kwargs)


BACKENDS = [pytest.param(conv_factor_update_triton, id="triton"), pytest.param(conv_factor_update_reference, id="torch")]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_oracle_patches_reproduce_the_convolution(case) -> None:
    _, shape, kernel, stride, _, pads, dilation, groups, _ = case
    x = make_x(shape).double().cpu()
    weight = torch.randn(2 * groups, shape[1] // groups, *kernel, dtype=torch.float64)
    begin, end = pads
    conv = F.conv1d if x.dim() == 3 else F.conv2d
    flat = [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]
    y = conv(F.pad(x, flat), weight, stride=stride, dilation=dilation, groups=groups)  # [N, O, *out]
    p = oracle_patches(x, kernel, stride, pads, dilation)
    p = p.reshape(p.shape[0], groups, -1)
    w = weight.reshape(groups, 2, -1)
    from_patches = torch.einsum("rgk,gok->rgo", p, w).reshape(p.shape[0], -1)
    torch.testing.assert_close(from_patches, y.flatten(2).transpose(1, 2).reshape(-1, 2 * groups),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_factor_equals_float64_patches_and_beta_zero_ignores_nan(fn, case) -> None:
    _, shape, kernel, stride, _, pads, dilation, groups, homogeneous = case
    x = make_x(shape)
    out = torch.full((*dim_of(case), dim_of(case)[1]), float("nan"), device=DEVICE)
    result = run(fn, out, x, case, alpha=0.25, beta=0.0, **SMALL)
    assert result is out
    want = 0.25 * oracle_factor(x, kernel, stride, pads, dilation, groups, homogeneous)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, out.transpose(1, 2))  # exactly symmetric


@pytest.mark.parametrize("fn", BACKENDS)
def test_ema_over_two_calls_reads_only_the_upper_triangle(fn) -> None:
    case = CASES[3]  # groups 2, homogeneous
    _, shape, kernel, stride, _, pads, dilation, groups, homogeneous = case
    x1, x2 = make_x(shape, seed=1), make_x(shape, seed=2)
    out = torch.empty(*dim_of(case), dim_of(case)[1], device=DEVICE)
    m, decay = shape[0], 0.75
    run(fn, out, x1, case, alpha=1 / m, beta=0.0, **SMALL)
    first = out.clone()
    out.tril_(-1).mul_(-3.0).add_(first.triu())  # garbage below the diagonal: never read
    run(fn, out, x2, case, alpha=(1 - decay) / m, beta=decay, **SMALL)
    factor = lambda x: oracle_factor(x, kernel, stride, pads, dilation, groups, homogeneous) / m  # noqa: E731
    want = decay * factor(x1) + (1 - decay) * factor(x2)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, out.transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn", BACKENDS)
def test_half_precision_inputs_accumulate_in_float32(fn, dtype) -> None:
    case = CASES[1]  # stride 2, pad 1
    _, shape, kernel, stride, _, pads, dilation, groups, homogeneous = case
    x = make_x(shape, dtype=dtype, seed=3)
    out = torch.empty(*dim_of(case), dim_of(case)[1], device=DEVICE)
    run(fn, out, x, case, alpha=1.0, beta=0.0, **SMALL)
    want = oracle_factor(x, kernel, stride, pads, dilation, groups, homogeneous)  # of the rounded values
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-4)  # products exact, sums in float32


@pytest.mark.parametrize("case", [CASES[2], CASES[6]], ids=[IDS[2], IDS[6]])
def test_kernel_equals_reference_with_split_rows_and_non_contiguous_input(case) -> None:
    x = make_x(case[1], seed=4)
    x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    out = torch.empty(*dim_of(case), dim_of(case)[1], device=DEVICE)
    ref = run(conv_factor_update_reference, out.clone(), x, case, alpha=0.5, beta=0.0)
    for splits in (1, 2, 3):
        got = run(conv_factor_update_triton, out.clone(), x, case, alpha=0.5, beta=0.0, splits=splits, **SMALL)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
        assert torch.equal(got, got.transpose(1, 2))
    # splits with beta: the partial Grams are summed before the EMA epilogue
    start = ref.clone()
    got = run(conv_factor_update_triton, start.clone(), x, case, alpha=0.5, beta=0.5, splits=2, **SMALL)
    torch.testing.assert_close(got, 1.5 * ref, rtol=1e-6, atol=1e-5)


def test_dispatch(monkeypatch) -> None:
    case = CASES[0]
    x = make_x(case[1])
    calls = []
    for name in ("conv_factor_update_triton", "conv_factor_update_reference"):
        original = getattr(cs, name)
        monkeypatch.setattr(cs, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    out = torch.empty(*dim_of(case), dim_of(case)[1], device=DEVICE)
    _, _, kernel, stride, padding, _, dilation, groups, homogeneous = case
    args = (out, x, kernel, stride, padding, dilation, groups)
    want = run(conv_factor_update_reference, out.clone(), x, case)
    conv_factor_update_(*args, homogeneous=homogeneous, backend="torch")
    assert calls == ["conv_factor_update_reference"] and torch.equal(out, want)
    conv_factor_update_(*args, homogeneous=homogeneous)  # "auto": unfold wins on CUDA too (dispatch.AUTO_ON_CUDA)
    assert calls[-1] == "conv_factor_update_reference"
    conv_factor_update_(*args, homogeneous=homogeneous, backend="triton", **SMALL)  # the interpreter on a CPU
    assert calls[-1] == "conv_factor_update_triton"
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        conv_factor_update_(*args, homogeneous=homogeneous, backend="cuda")


def test_bad_arguments_are_refused() -> None:
    x = make_x((2, 3, 5, 5))
    with pytest.raises(ValueError, match="float32 of shape"):  # on DEVICE: the reference reads out's device
        conv_factor_update_reference(torch.empty(1, 27, 27, device=DEVICE), x, 3, homogeneous=True)
    with pytest.raises(ValueError, match="at least 16"):
        conv_factor_update_triton(torch.empty(1, 27, 27, device=DEVICE), x, 3, block_d=8)
    with pytest.raises(ValueError, match="groups"):
        conv_factor_update_reference(torch.empty(2, 14, 14), x, 3, groups=2)
    with pytest.raises(ValueError, match="conv1d"):
        conv_factor_update_reference(torch.empty(1, 9, 9), make_x((1, 1, 3, 3, 3)), 3)


CONVS = [
    pytest.param(lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (7, 6), id="strided grouped, bias"),
    pytest.param(lambda: nn.Conv2d(3, 4, (2, 3), padding="same", dilation=(1, 2), bias=False), (5, 6),
                 id="same (asymmetric) dilated, no bias"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("make, spatial", CONVS)
def test_runtime_a_factor_equals_the_kernel(make, spatial) -> None:
    torch.manual_seed(5)
    n = 2
    conv = make().to(DEVICE)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten())
    x = torch.randn(n, conv.in_channels, *spatial, device=DEVICE)
    layer = conv_layer("0", conv)
    with Capture(model, (layer,)) as cap:
        loss = model(x).square().sum()
    loss.backward()
    records = cap.records["0"]
    a, _ = batch_factors(layer, records, batch_size=n, dtype=torch.float32)
    out = torch.empty_like(a)
    conv_factor_update_(out, records[0].a, **geometry_arguments(records[0].geometry, x.shape[2:]),
                        homogeneous=conv.bias is not None, alpha=1 / n, beta=0.0, backend="triton", **SMALL)
    torch.testing.assert_close(out, a, rtol=1e-5, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compiled_kernel_on_cuda(case, dtype) -> None:
    _, shape, kernel, stride, padding, pads, dilation, groups, homogeneous = case
    big = (16, shape[1] * 8, *(4 * s for s in shape[2:]))  # many rows: the default splits kick in
    x = make_x(big, dtype=dtype, seed=6)
    d = big[1] // groups * math.prod(kernel) + homogeneous
    out = torch.full((groups, d, d), float("nan"), device="cuda")
    conv_factor_update_(out, x, kernel, stride, padding, dilation, groups, homogeneous=homogeneous,
                        alpha=0.5, beta=0.0, backend="triton")
    want = 0.5 * oracle_factor(x.cpu(), kernel, stride, pads, dilation, groups, homogeneous)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-4, atol=1e-3)
    assert torch.equal(out, out.transpose(1, 2))
    ref = conv_factor_update_reference(torch.empty_like(out), x, kernel, stride, padding, dilation, groups,
                                       homogeneous=homogeneous, alpha=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    ema = out.clone()
    conv_factor_update_(ema, x, kernel, stride, padding, dilation, groups, homogeneous=homogeneous,
                        alpha=0.5, beta=0.5, backend="triton", block_rows=32, block_d=32, splits=1)
    torch.testing.assert_close(ema, 1.5 * out, rtol=1e-4, atol=1e-3)
