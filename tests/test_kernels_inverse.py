"""Newton-Schulz damped inverses (triton_kernels/inverse.py) against dense float64 algebra.

Without CUDA the Triton kernel runs in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), with
16-wide tiles so that d = 17 and 40 span several tiles and leave ragged edges. The CUDA test at the end runs
the compiled kernel with the GPU tiles and is skipped without a device.
"""

from __future__ import annotations

import pytest
import torch
from devices import DEVICE, requires_cuda

from kronograph.triton_kernels import inverse as ns
from kronograph.triton_kernels.inverse import (
    batched_gemm,
    batched_gemm_reference,
    batched_gemm_triton,
    damped_inverse_ns,
    newton_schulz,
    newton_schulz_reference,
    newton_schulz_triton,
)

pytestmark = pytest.mark.usefixtures("one_thread", "on_kernel_device")

SMALL = (16, 16, 16)  # several tiles per matrix at d = 17, 40, with ragged edges: the GEMM tests, and some below
ONE = (64, 64, 64)  # one tile per matrix (d <= 64): the interpreter costs per program, so most inverses use it
F64 = torch.float64


def spd(groups: int, d: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """Random PSD factors [groups, d, d] of moderate condition (a covariance of 2d samples)."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    x = torch.randn(groups, d, 2 * d, dtype=F64, generator=generator)
    return (x @ x.transpose(1, 2) / (2 * d)).to(dtype)


def conditioned(groups: int, d: int, cond: float, damping: float, seed: int) -> torch.Tensor:
    """PSD factors whose damped matrix M + damping I has eigenvalues from 1/cond to 1 (condition ``cond``)."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(groups, d, d, dtype=F64, generator=generator))
    eigenvalues = torch.logspace(-torch.log10(torch.tensor(cond)).item(), 0, d, dtype=F64) - damping
    return q @ torch.diag_embed(eigenvalues.expand(groups, d)) @ q.transpose(1, 2)


def exact(m: torch.Tensor, damping) -> torch.Tensor:
    groups, d = m.shape[0], m.shape[-1]
    damping = torch.as_tensor(damping, dtype=F64).expand(groups)
    return torch.linalg.inv(m.double() + damping[:, None, None] * torch.eye(d, dtype=F64))


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """max over groups of ||x - y||_inf / ||y||_inf."""
    norm = lambda t: t.abs().sum(-1).amax(-1)  # noqa: E731
    return float((norm(x.double() - y) / norm(y)).max())


# --- the GEMM kernel --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 17, 40), (2, 17, 33, 5), (1, 40, 40, 40)])
def test_gemm_matches_bmm(shape, dtype):
    groups, m, k, n = shape
    generator = torch.Generator(DEVICE).manual_seed(sum(shape))
    a = torch.randn(groups, m, k, dtype=dtype, generator=generator)
    b = torch.randn(groups, k, n, dtype=dtype, generator=generator)
    c = torch.randn(groups, m, n, dtype=dtype, generator=generator)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batched_gemm_triton(a, b, blocks=SMALL), torch.bmm(a, b), **tol)
    expected = -1.5 * torch.bmm(a, b) + 0.5 * c + 2.0 * torch.eye(m, n, dtype=dtype)
    got = batched_gemm_triton(a, b, c, alpha=-1.5, beta=0.5, shift=2.0, blocks=SMALL)
    torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(batched_gemm_reference(a, b, c, -1.5, 0.5, 2.0), expected, **tol)


def test_gemm_strided_and_bf16_operands():
    generator = torch.Generator(DEVICE).manual_seed(0)
    a = torch.randn(3, 33, 17, generator=generator).transpose(1, 2)  # [3, 17, 33], not contiguous
    b = torch.randn(3, 33, 19, generator=generator)
    torch.testing.assert_close(batched_gemm_triton(a, b, blocks=SMALL), torch.bmm(a, b), rtol=1e-5, atol=1e-5)
    a16, b16 = a.bfloat16(), b.bfloat16()
    got = batched_gemm_triton(a16, b16, blocks=SMALL)
    assert got.dtype == torch.bfloat16
    # float32 accumulation of the bf16 products, rounded once to bf16: the reference's result
    torch.testing.assert_close(got, batched_gemm_reference(a16, b16), rtol=1e-2, atol=1e-2)


def test_gemm_rejects_bad_arguments():
    a = torch.zeros(1, 4, 4)
    with pytest.raises(ValueError, match="power of two"):
        batched_gemm_triton(a, a, blocks=(8, 16, 16))
    with pytest.raises(ValueError, match="one dtype"):
        batched_gemm_triton(a, a.double())
    with pytest.raises(ValueError):
        batched_gemm_triton(a, torch.zeros(1, 5, 4))


# --- the inverse ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("d", [1, 5, 17, 40])
def test_inverse_matches_inv(d, groups):
    m = spd(groups, d, seed=d + groups)
    damping = torch.linspace(0.05, 0.2, groups, dtype=F64)
    blocks = SMALL if (d, groups) == (17, 1) else ONE
    result = newton_schulz(m, damping, tolerance=1e-10, blocks=blocks, backend="triton")
    assert result.converged.all() and not result.failed.any()  # Newton-Schulz did it, no fallback
    assert (result.residual <= 1e-10).all()
    assert relative_error(result.inverse, exact(m, damping)) <= 1e-9


def test_float32_default_tolerance():
    m = spd(3, 17, seed=1, dtype=torch.float32)
    inverse, failed = damped_inverse_ns(m, 0.1, blocks=ONE, backend="triton")
    assert inverse.dtype == torch.float32 and not failed.any()
    assert relative_error(inverse, exact(m, 0.1)) <= 2e-3  # TOLERANCE[float32] = 1e-3, plus rounding


def test_ill_conditioned():
    damping = 0.5e-4
    m = conditioned(1, 40, cond=1e4, damping=damping, seed=2)
    assert float(torch.linalg.cond(m + damping * torch.eye(40, dtype=F64)).max()) == pytest.approx(1e4, rel=1e-6)
    result = newton_schulz(m, damping, tolerance=1e-10, blocks=ONE, backend="triton")
    assert result.converged.all() and not result.failed.any()
    assert relative_error(result.inverse, exact(m, damping)) <= 1e-9
    # float32: Newton-Schulz or its fallback, accurate to float32's eps * cond either way
    inverse, failed = damped_inverse_ns(m.float(), damping, blocks=ONE, backend="triton")
    assert not failed.any() and torch.isfinite(inverse).all()
    assert relative_error(inverse, exact(m.float(), damping)) <= 1e-2


def test_warm_start_takes_fewer_iterations():
    damping = 0.01
    m = spd(3, 17, seed=3)
    previous = exact(m, damping)
    moved = m + 1e-3 * spd(3, 17, seed=4)  # factors move slowly between refreshes
    cold = newton_schulz(moved, damping, tolerance=1e-10, blocks=ONE, backend="triton")
    warm = newton_schulz(moved, damping, previous=previous, tolerance=1e-10, blocks=ONE, backend="triton")
    print(f"iterations: cold {cold.iterations.tolist()}, warm {warm.iterations.tolist()}")
    assert warm.warm.all() and not cold.warm.any()
    assert cold.converged.all() and warm.converged.all()
    assert (warm.iterations < cold.iterations).all()
    assert (warm.iterations <= 4).all()
    truth = exact(moved, damping)
    assert relative_error(warm.inverse, truth) <= 1e-9 and relative_error(cold.inverse, truth) <= 1e-9


def test_bad_previous_is_ignored():
    damping = 0.1
    m = spd(3, 17, seed=5)
    truth = exact(m, damping)
    previous = truth.clone()
    previous[1, 3, 4] = float("nan")
    previous[2] *= 100  # residual I - 100 I: far off
    result = newton_schulz(m, damping, previous=previous, tolerance=1e-10, blocks=ONE, backend="triton")
    assert result.warm.tolist() == [True, False, False]
    assert result.converged.all() and not result.failed.any()
    assert relative_error(result.inverse, truth) <= 1e-9
    with pytest.raises(ValueError, match="previous"):
        newton_schulz(m, damping, previous=previous[:2], backend="triton")


def test_non_finite_factors_give_inverse_damping():
    m = spd(3, 5, seed=6)
    m[1, 2, 2] = float("nan")
    m[2, 0, 4] = float("inf")
    damping = torch.tensor([0.5, 0.25, 2.0], dtype=F64)
    inverse, failed = damped_inverse_ns(m, damping, tolerance=1e-10, blocks=ONE, backend="triton")
    assert failed.tolist() == [False, True, True]
    assert torch.isfinite(inverse).all()
    eye = torch.eye(5, dtype=F64)
    torch.testing.assert_close(inverse[1], 4.0 * eye)
    torch.testing.assert_close(inverse[2], 0.5 * eye)
    assert relative_error(inverse[:1], exact(m[:1], 0.5)) <= 1e-9
    # a non-finite damping fails its group too (damping treated as 0: the identity)
    inverse, failed = damped_inverse_ns(spd(2, 5, seed=7), torch.tensor([0.1, float("nan")], dtype=F64),
                                        blocks=ONE, backend="triton")
    assert failed.tolist() == [False, True]
    torch.testing.assert_close(inverse[1], eye)


def test_singular_undamped_factor_fails_safely():
    m = torch.zeros(2, 5, 5, dtype=F64)  # zero factors, no damping: singular
    inverse, failed = damped_inverse_ns(m, 0.0, max_iterations=3, blocks=ONE, backend="triton")
    assert failed.all()
    torch.testing.assert_close(inverse, torch.eye(5, dtype=F64).expand(2, 5, 5))


def test_low_precision_factor_never_overflows():
    m = torch.zeros(1, 5, 5, dtype=torch.float16)
    inverse, failed = damped_inverse_ns(m, 1e-6, blocks=ONE, backend="triton")  # 1e6 I: beyond fp16's range
    assert inverse.dtype == torch.float16 and not failed.any() and torch.isfinite(inverse).all()
    m = spd(3, 17, seed=8, dtype=torch.bfloat16)
    inverse, failed = damped_inverse_ns(m, 0.1, blocks=ONE, backend="triton")
    assert inverse.dtype == torch.bfloat16 and not failed.any()
    assert relative_error(inverse, exact(m, 0.1)) <= 2e-2


@pytest.mark.parametrize("max_iterations", [0, 1])
def test_iteration_cap_falls_back_to_cholesky(max_iterations):
    m = spd(3, 40, seed=9)
    result = newton_schulz(m, 0.05, tolerance=1e-10, max_iterations=max_iterations, blocks=ONE,
                           backend="triton")
    assert not result.converged.any() and not result.failed.any()
    assert (result.iterations == max_iterations).all()
    assert relative_error(result.inverse, exact(m, 0.05)) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_reference_equals_kernel(dtype):
    damping = torch.tensor([0.05, 0.1, 0.2], dtype=F64)
    m = spd(3, 17, seed=10, dtype=dtype)
    previous = exact(spd(3, 17, seed=10) + 1e-3 * spd(3, 17, seed=11), damping).to(dtype)
    previous[2] = float("nan")
    kernel = newton_schulz_triton(m, damping, previous=previous, blocks=SMALL if dtype == F64 else ONE)
    reference = newton_schulz_reference(m, damping, previous=previous)
    assert kernel.warm.tolist() == reference.warm.tolist() == [True, True, False]
    assert kernel.iterations.tolist() == reference.iterations.tolist()
    assert kernel.converged.tolist() == reference.converged.tolist()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernel.inverse, reference.inverse, **tol)


def test_dispatch(monkeypatch):
    m = spd(2, 5, seed=12)
    calls = []
    real = ns.damped_inverse_ns_triton

    def spy(*args):
        calls.append("triton")
        return real(*args)

    monkeypatch.setattr(ns, "damped_inverse_ns_triton", spy)
    for backend in ("torch", "auto"):  # "auto": Cholesky wins on CUDA too (dispatch.AUTO_ON_CUDA), no interpreter
        inverse, _ = damped_inverse_ns(m, 0.1, backend=backend)
        assert relative_error(inverse, exact(m, 0.1)) <= 1e-9
    assert calls == []
    inverse, _ = damped_inverse_ns(m, 0.1, blocks=ONE, backend="triton")  # on a CPU tensor, the interpreter
    assert calls == ["triton"] and relative_error(inverse, exact(m, 0.1)) <= 1e-9

    gemm_calls = []
    monkeypatch.setattr(ns, "batched_gemm_triton", lambda *args: gemm_calls.append(1) or torch.bmm(*args[:2]))
    batched_gemm(m, m, backend="auto")
    assert gemm_calls == []
    batched_gemm(m, m, backend="triton")
    assert gemm_calls == [1]
    with pytest.raises(ValueError, match="backend"):
        damped_inverse_ns(m, 0.1, backend="cuda")


@requires_cuda
def test_compiled_kernels_on_cuda():
    generator = torch.Generator(DEVICE).manual_seed(13)
    for groups, m_, k, n in [(3, 17, 40, 5), (2, 200, 300, 130)]:
        a = torch.randn(groups, m_, k, generator=generator).cuda()
        b = torch.randn(groups, k, n, generator=generator).cuda()
        expected = torch.bmm(a.double(), b.double()).float()
        got = batched_gemm(a, b, backend="triton")
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # IEEE fp32, not TF32
    for d in (17, 40, 256):
        m = spd(4, d, seed=d)
        cold = newton_schulz(m.cuda(), 0.1, tolerance=1e-10, backend="triton")
        assert cold.inverse.is_cuda and cold.converged.all() and not cold.failed.any()
        assert relative_error(cold.inverse, exact(m, 0.1)) <= 1e-9
        moved = m + 1e-3 * spd(4, d, seed=d + 1)
        warm = newton_schulz(moved.float().cuda(), 0.1, previous=cold.inverse.float(), backend="triton")
        assert warm.warm.all() and warm.converged.all()
        assert (warm.iterations < newton_schulz(moved.float().cuda(), 0.1, backend="triton").iterations).all()
        assert relative_error(warm.inverse, exact(moved, 0.1)) <= 2e-3
