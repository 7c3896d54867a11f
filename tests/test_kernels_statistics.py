"""The factor statistics kernel (triton_kernels/statistics.py) against a float64 X~^T X~ written here.

Without CUDA the kernel runs in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1 before this
module imports it), with 16 x 16 tiles so that small sizes span several tiles; with CUDA the last tests run
the compiled kernel at its default tiles.
"""

from __future__ import annotations

import pytest
import torch

from kronograph.triton_kernels import statistics
from kronograph.triton_kernels.statistics import factor_update_, factor_update_reference, factor_update_triton

from devices import DEVICE, requires_cuda

pytestmark = pytest.mark.usefixtures("on_kernel_device")

SMALL = {"block_d": 16, "block_r": 16}


def expected(out: torch.Tensor | None, rows: torch.Tensor, alpha: float, beta: float, homogeneous: bool):
    """beta out + alpha X~^T X~ in float64, from the rows as given (bf16/fp16 values are exact in float64);
    out None or beta 0: the Gram alone."""
    x = rows.double()
    if homogeneous:
        x = torch.cat([x, torch.ones(*x.shape[:2], 1, dtype=x.dtype, device=x.device)], dim=2)
    gram = alpha * torch.einsum("gri,grj->gij", x, x)
    return gram if out is None or beta == 0 else beta * out.double() + gram


def assert_gram_close(actual: torch.Tensor, wanted: torch.Tensor, tolerance: float = 2e-6) -> None:
    """float32 accumulation against float64: relative to the largest entry of each group's result."""
    scale = wanted.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1.0)
    error = (actual.double() - wanted).abs()
    assert torch.all(error <= tolerance * scale), error.max()


def assert_symmetric(out: torch.Tensor) -> None:
    assert torch.equal(out, out.transpose(1, 2))


def rows_of(groups: int, count: int, d: int, dtype=torch.float32, device=DEVICE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(DEVICE).manual_seed(seed)
    return torch.randn(groups, count, d, generator=generator).to(device=device, dtype=dtype)


def launch(out, rows, alpha, beta, homogeneous):
    return statistics._launch(out, rows, alpha, beta, homogeneous, **SMALL)


@pytest.mark.parametrize("homogeneous", [False, True])
@pytest.mark.parametrize("count", [1, 5, 129])
@pytest.mark.parametrize("d", [1, 7, 33, 70])
def test_one_group_matches_float64(d, count, homogeneous):
    rows = rows_of(1, count, d, seed=d * 1000 + count)
    size = d + homogeneous
    out = launch(torch.empty(1, size, size), rows, 0.5, 0.0, homogeneous)
    assert_gram_close(out, expected(None, rows, 0.5, 0.0, homogeneous))
    assert_symmetric(out)


@pytest.mark.parametrize("homogeneous", [False, True])
@pytest.mark.parametrize(("d", "count"), [(7, 129), (33, 5), (70, 33)])
def test_three_groups_match_float64(d, count, homogeneous):
    rows = rows_of(3, count, d, seed=d + count)
    rows[1] *= 10.0  # groups of different scales: each is its own Gram
    size = d + homogeneous
    out = launch(torch.empty(3, size, size), rows, 1.0 / count, 0.0, homogeneous)
    assert_gram_close(out, expected(None, rows, 1.0 / count, 0.0, homogeneous))
    assert_symmetric(out)


def test_default_tiles():
    rows = rows_of(2, 40, 70)  # D = 71: two 64-tiles, three tile pairs, two 32-row steps
    out = factor_update_triton(torch.empty(2, 71, 71), rows, 0.25, 0.0, homogeneous=True)
    assert_gram_close(out, expected(None, rows, 0.25, 0.0, True))
    assert_symmetric(out)


@pytest.mark.parametrize("run", [launch, factor_update_reference], ids=["triton", "reference"])
def test_beta_zero_ignores_nan(run):
    rows = rows_of(2, 9, 20)
    out = run(torch.full((2, 21, 21), float("nan")), rows, 0.1, 0.0, True)
    assert torch.isfinite(out).all()
    assert_gram_close(out, expected(None, rows, 0.1, 0.0, True))


@pytest.mark.parametrize("run", [launch, factor_update_reference], ids=["triton", "reference"])
def test_ema_over_two_calls(run):
    first, second = rows_of(3, 17, 18, seed=1), rows_of(3, 23, 18, seed=2)
    decay = 0.95
    out = torch.empty(3, 19, 19)
    assert run(out, first, 1.0 / 17, 0.0, True) is out
    assert run(out, second, (1 - decay) / 23, decay, True) is out
    wanted = expected(expected(None, first, 1.0 / 17, 0.0, True), second, (1 - decay) / 23, decay, True)
    assert_gram_close(out, wanted)
    assert_symmetric(out)


def test_only_the_upper_triangle_of_out_is_read():
    """A stale lower triangle (runtime.factors' mirror=False) and NaN below the diagonal do not matter."""
    rows = rows_of(1, 12, 40)
    old = torch.randn(1, 40, 40)
    symmetric = old.triu() + old.triu(1).transpose(1, 2)
    below = torch.ones(40, 40, dtype=torch.bool).tril(-1)
    for junk in (old, torch.where(below, float("nan"), old)):
        for run in (launch, factor_update_reference):
            out = run(junk.clone(), rows, 0.3, 0.9, False)
            assert_gram_close(out, expected(symmetric, rows, 0.3, 0.9, False))
            assert_symmetric(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("run", [launch, factor_update_reference], ids=["triton", "reference"])
def test_half_precision_rows_accumulate_in_float32(dtype, run):
    rows = rows_of(3, 37, 21, dtype=dtype, seed=3)
    out = run(torch.empty(3, 22, 22), rows, 1.0 / 37, 0.0, True)
    assert out.dtype == torch.float32
    # Products of bf16/fp16 values are exact in float32: only the float32 sums round.
    assert_gram_close(out, expected(None, rows, 1.0 / 37, 0.0, True))
    assert_symmetric(out)


def test_strided_rows_need_no_copy():
    """The rows of runtime.factors.site_rows: [R, groups * d] reshaped and transposed to [groups, R, d]."""
    flat = rows_of(1, 30, 3 * 11, seed=4)[0]
    rows = flat.reshape(30, 3, 11).transpose(0, 1)
    assert not rows.is_contiguous()
    out = launch(torch.empty(3, 12, 12), rows, 1.0, 0.0, True)
    assert_gram_close(out, expected(None, rows, 1.0, 0.0, True))


def test_out_may_be_a_strided_view():
    rows = rows_of(2, 10, 19, seed=5)
    storage = torch.zeros(2, 20, 24)
    launch(storage[:, :, 2:22], rows, 1.0, 0.0, True)
    assert_gram_close(storage[:, :, 2:22], expected(None, rows, 1.0, 0.0, True))
    assert torch.all(storage[:, :, :2] == 0) and torch.all(storage[:, :, 22:] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("homogeneous", [False, True])
def test_reference_equals_kernel(homogeneous, dtype):
    rows = rows_of(3, 45, 35, dtype=dtype, seed=6)
    size = 35 + homogeneous
    start = expected(None, rows_of(3, 8, 35, seed=7), 1.0, 0.0, homogeneous).float()
    kernel = launch(start.clone(), rows, 0.02, 0.9, homogeneous)
    reference = factor_update_reference(start.clone(), rows, 0.02, 0.9, homogeneous)
    assert kernel.shape == reference.shape == (3, size, size)
    assert_gram_close(kernel, reference.double())  # both float32 sums, in different orders


def test_reference_in_float64():
    rows = rows_of(2, 6, 5, seed=8).double()
    out = factor_update_reference(torch.empty(2, 6, 6, dtype=torch.float64), rows, 2.0, 0.0, True)
    torch.testing.assert_close(out, expected(None, rows, 2.0, 0.0, True), rtol=1e-14, atol=1e-14)
    assert_symmetric(out)


def test_no_rows_scales_out():
    start = expected(None, rows_of(1, 4, 17), 1.0, 0.0, False).float()
    for run in (launch, factor_update_reference):
        out = run(start.clone(), torch.empty(1, 0, 17), 1.0, 0.5, False)
        torch.testing.assert_close(out, 0.5 * start)


def test_checks():
    rows = rows_of(2, 3, 4)
    with pytest.raises(ValueError, match="out must be"):
        factor_update_(torch.empty(2, 4, 4), rows, 1.0, 0.0, homogeneous=True, backend="torch")
    with pytest.raises(ValueError, match="groups, R, d"):
        factor_update_(torch.empty(4, 4), rows[0], 1.0, 0.0, backend="torch")
    with pytest.raises(ValueError, match="float64"):
        factor_update_(torch.empty(2, 4, 4, dtype=torch.float64), rows, 1.0, 0.0, backend="triton")
    with pytest.raises(ValueError, match="block_d"):
        statistics._launch(torch.empty(2, 4, 4), rows, 1.0, 0.0, False, block_d=8, block_r=16)
    with pytest.raises(ValueError, match="backend"):
        factor_update_(torch.empty(2, 4, 4), rows, 1.0, 0.0, backend="cuda")


def _refuse(*args, **kwargs):
    raise AssertionError("this backend must not run here")


class _NoKernel:
    def __getitem__(self, grid):
        return _refuse


def test_torch_backend_never_calls_triton(monkeypatch):
    monkeypatch.setattr(statistics, "_factor_update_kernel", _NoKernel())
    monkeypatch.setattr(statistics, "factor_update_triton", _refuse)
    rows = rows_of(1, 5, 6)
    out = factor_update_(torch.empty(1, 7, 7), rows, 1.0, 0.0, homogeneous=True, backend="torch")
    assert_gram_close(out, expected(None, rows, 1.0, 0.0, True))


def test_auto_on_cpu_picks_the_reference(monkeypatch):
    monkeypatch.setattr(statistics, "_factor_update_kernel", _NoKernel())
    monkeypatch.setattr(statistics, "factor_update_triton", _refuse)
    rows = rows_of(1, 5, 6, device="cpu")
    out = factor_update_(torch.empty(1, 6, 6, device="cpu"), rows, 1.0, 0.0)
    assert_gram_close(out, expected(None, rows, 1.0, 0.0, False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path: a CPU-only machine")
def test_triton_backend_on_cpu_runs_the_interpreter(monkeypatch):
    monkeypatch.setattr(statistics, "factor_update_reference", _refuse)
    rows = rows_of(2, 5, 6)
    out = factor_update_(torch.empty(2, 7, 7), rows, 1.0, 0.0, homogeneous=True, backend="triton")
    assert_gram_close(out, expected(None, rows, 1.0, 0.0, True))
    assert_symmetric(out)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(("groups", "count", "d"), [(1, 1, 1), (3, 129, 70), (2, 1000, 257), (4, 512, 784)])
def test_compiled_kernel_on_cuda(groups, count, d, dtype, monkeypatch):
    monkeypatch.setattr(statistics, "factor_update_reference", _refuse)  # "auto" must pick the kernel on cuda
    # 16-bit rows go through the tensor cores, whose float32 accumulation is not rounded as IEEE sums are: on an
    # H200, 2.5e-6 of the largest entry at R = 1000 (the float32 products of the CPU paths stay under 2e-6)
    tolerance = 2e-6 if dtype == torch.float32 else 1e-5
    rows = rows_of(groups, count, d, dtype=dtype, device="cuda", seed=count + d)
    start = expected(None, rows_of(groups, 16, d, device="cuda", seed=9), 1.0 / 16, 0.0, True).float()
    for homogeneous, out in ((True, start.clone()), (False, start[:, :d, :d].contiguous())):
        wanted = expected(out, rows, 0.05 / count, 0.95, homogeneous)
        factor_update_(out, rows, 0.05 / count, 0.95, homogeneous)
        assert_gram_close(out, wanted, tolerance)
        assert_symmetric(out)
        nan = torch.full_like(out, float("nan"))
        factor_update_(nan, rows, 1.0 / count, 0.0, homogeneous)
        assert_gram_close(nan, expected(None, rows, 1.0 / count, 0.0, homogeneous), tolerance)
    small = statistics._launch(torch.empty(groups, d + 1, d + 1, device="cuda"), rows, 1.0, 0.0, True, **SMALL)
    assert_gram_close(small, expected(None, rows, 1.0, 0.0, True), tolerance)
