"""Batched damped inverses of SPD Kronecker factors by Newton-Schulz: matmuls only, warm-started, never NaN.

Why: a Cholesky or eigendecomposition of many small factors runs far below a GPU's GEMM rate, while the
Newton-Schulz iteration X <- X (2I - M_d X) is nothing but batched GEMMs (one Triton kernel, batched across
the layers of one size). K-FAC's factors move slowly between refreshes, so starting from the previous inverse
makes a refresh a few GEMMs. Every result is checked: the residual R = I - M_d X is measured per group, and a
group that did not reach the tolerance (or stalled at its rounding floor, or diverged) is inverted by Cholesky
instead, with a float64 retry, exactly as ``runtime/inverse.py``'s ``damped_inverse``; a group whose factor or
damping is not finite gets 1/damping I and is reported failed. No non-finite inverse is ever returned.

Start and stopping rules (M_d = M + damping I, norms are the induced infinity norm, max absolute row sum):

* warm start X0 = previous when it is given, finite and ||I - M_d X0|| < 1. Since I - M_d X_{k+1} = (I - M_d
  X_k)^2 exactly, ||R_k|| <= ||R_0||^(2^k): convergence is guaranteed, quadratic from the first step.
* otherwise the safe start X0 = I / ||M_d||. For symmetric M_d with eigenvalues 0 < l_min <= l_max, every
  induced norm bounds the spectral radius, so l_max <= ||M_d|| and R_0 = I - M_d / ||M_d|| is symmetric with
  eigenvalues 1 - l/||M_d|| in [0, 1): R_k = R_0^(2^k) -> 0, after about log2(||M_d|| / l_min) steps of
  slow start and a few quadratic ones. (The infinity norm costs one reduction; the scaled identity commutes
  with M_d, which is what makes the symmetric-eigenvalue argument apply.)
* stop a group when ||R|| <= tolerance (then ||X - M_d^-1|| <= tolerance ||M_d^-1||: the tolerance is a
  relative error of the inverse), or when it stalls: once ||R_k|| < 1 exact arithmetic gives ||R_{k+1}|| <=
  ||R_k||^2, so a step that does not get at least halfway from ||R_k|| to ||R_k||^2 has hit the rounding
  floor (about eps * cond(M_d)) and the group goes to the Cholesky fallback, as it does after max_iterations.

The residual norms are torch reductions; the iteration's matmuls are ``batched_gemm`` (alpha A B + beta C +
shift I per group in one pass, float32 accumulation, float64 for float64 operands, IEEE float32 products:
TF32 would put the rounding floor near 1e-3 cond(M_d)). Host synchronisations: one per iteration (which groups
are still active) and one each for the fallback and failure checks.

``tests/test_kernels_inverse.py`` proves, under TRITON_INTERPRET=1 on CPU (and compiled on CUDA when present):
the GEMM kernel equals torch.bmm for sizes that are not multiples of the block, transposed and bf16 operands;
the inverse equals torch.linalg.inv of the damped factor in float64 at the tolerance (d = 1, 5, 17, 40; one and
three groups; condition 1e4); the warm start takes fewer iterations than the cold one; a NaN or far-off
previous is ignored; non-finite factors give 1/damping I and failed; max_iterations=1 still returns the exact
Cholesky inverse; kernel and reference agree; and the dispatch picks the reference on CPU unless told.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kronograph.runtime.inverse import cholesky_inverse, damping_inverse, finite_per_group, safe_damped
from kronograph.triton_kernels.dispatch import interpreting, use_triton
from kronograph.triton_kernels.tiles import tile_product

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the dispatch then never picks Triton
    triton = None

#: GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K) on a GPU; each at least 16 (tl.dot) and a power of two.
BLOCKS = (64, 64, 32)

#: Default residual tolerance per working dtype (float32 for float32/bf16/fp16 factors): a relative error
#: of the inverse far below what a preconditioner notices, above float32's rounding floor for the condition
#: numbers damping leaves (eps * cond ~ 1e-4 at cond 1e3).
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-10}

#: Default iteration cap: a cold start needs about log2(||M_d|| / l_min) + 5 iterations (cond 1e6 -> ~25).
MAX_ITERATIONS = 40


if triton is not None:

    @triton.jit
    def _batched_gemm_kernel(
        a_ptr, b_ptr, c_ptr, out_ptr,
        M, N, K,
        stride_ag, stride_am, stride_ak,
        stride_bg, stride_bk, stride_bn,
        stride_cg, stride_cm, stride_cn,
        stride_og, stride_om, stride_on,
        alpha, beta, shift,
        HAS_C: tl.constexpr,
        FP64: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[g] = alpha a[g] @ b[g] + beta c[g] + shift I, one (BLOCK_M, BLOCK_N) tile per program."""
        group = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tile_product(a_ptr, b_ptr, group, rows, cols, M, N, K, stride_ag, stride_am, stride_ak,
                           stride_bg, stride_bk, stride_bn, UPCAST, FP64, "ieee", BLOCK_M, BLOCK_N, BLOCK_K)
        acc = acc * alpha
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        if HAS_C:
            c_ptrs = c_ptr + group * stride_cg + rows[:, None] * stride_cm + cols[None, :] * stride_cn
            acc += beta * tl.load(c_ptrs, mask=inside, other=0.0).to(acc.dtype)
        acc = tl.where(rows[:, None] == cols[None, :], acc + shift, acc)
        out_ptrs = out_ptr + group * stride_og + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _check_gemm(a: torch.Tensor, b: torch.Tensor, addend: torch.Tensor | None) -> None:
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"batched_gemm needs a [g, m, k] and b [g, k, n]; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"batched_gemm needs operands of one dtype; got {a.dtype} and {b.dtype}")
    if addend is not None and addend.shape != (a.shape[0], a.shape[1], b.shape[2]):
        raise ValueError(f"addend must be [{a.shape[0]}, {a.shape[1]}, {b.shape[2]}]; got {tuple(addend.shape)}")


def batched_gemm_triton(a: torch.Tensor, b: torch.Tensor, addend: torch.Tensor | None = None, alpha: float = 1.0,
                        beta: float = 1.0, shift: float = 0.0, blocks: tuple[int, int, int] = BLOCKS) -> torch.Tensor:
    """alpha a @ b + beta addend + shift I per group ([g, m, k] @ [g, k, n] -> [g, m, n] in a's dtype), by the
    Triton kernel: grid (group, row tile, column tile), masked edges, any strides (a transposed view is free),
    float32 accumulation (float64 for float64 operands). ``blocks`` = (BLOCK_M, BLOCK_N, BLOCK_K)."""
    _check_gemm(a, b, addend)
    block_m, block_n, block_k = blocks
    if min(blocks) < 16 or any(x & (x - 1) for x in blocks):
        raise ValueError(f"blocks={blocks}: each must be a power of two >= 16 (tl.dot)")
    groups, m, n, k = a.shape[0], a.shape[1], b.shape[2], a.shape[2]
    out = torch.empty(groups, m, n, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if k == 0:
        a = a.new_zeros(groups, m, 1)
        b = b.new_zeros(groups, 1, n)
        k = 1
    c = addend if addend is not None else out
    grid = (groups, triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _batched_gemm_kernel[grid](
        a, b, c, out, m, n, k,
        *a.stride(), *b.stride(), *c.stride(), *out.stride(),
        float(alpha), float(beta), float(shift),
        HAS_C=addend is not None, FP64=a.dtype == torch.float64,
        UPCAST=a.dtype == torch.bfloat16 and interpreting(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def batched_gemm_reference(a: torch.Tensor, b: torch.Tensor, addend: torch.Tensor | None = None,
                           alpha: float = 1.0, beta: float = 1.0, shift: float = 0.0,
                           blocks: tuple[int, int, int] = BLOCKS) -> torch.Tensor:
    """``batched_gemm_triton`` with torch.matmul (``blocks`` is ignored)."""
    _check_gemm(a, b, addend)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    out = torch.matmul(a.to(acc), b.to(acc)) * alpha
    if addend is not None:
        out = out + beta * addend.to(acc)
    if shift:
        out.diagonal(dim1=-2, dim2=-1).add_(shift)
    return out.to(a.dtype)


def batched_gemm(a: torch.Tensor, b: torch.Tensor, addend: torch.Tensor | None = None, alpha: float = 1.0,
                 beta: float = 1.0, shift: float = 0.0, blocks: tuple[int, int, int] = BLOCKS,
                 backend: str = "auto") -> torch.Tensor:
    """alpha a @ b + beta addend + shift I per group, on the kernel ``use_triton`` picks."""
    gemm = batched_gemm_triton if use_triton(backend, a, "inverse") else batched_gemm_reference
    return gemm(a, b, addend, alpha, beta, shift, blocks)


@dataclass
class NewtonSchulzResult:
    """A batched damped inverse and how each group got it."""

    inverse: torch.Tensor  # [groups, d, d] in m's dtype, always finite
    failed: torch.Tensor  # [groups] bool: not finite, or Cholesky failed too -> 1/damping I (as damped_inverse)
    converged: torch.Tensor  # [groups] bool: Newton-Schulz met the tolerance (the others took the fallback)
    warm: torch.Tensor  # [groups] bool: started from ``previous``
    iterations: torch.Tensor  # [groups] int64: Newton-Schulz steps run (0: the start was within tolerance)
    residual: torch.Tensor  # [groups]: ||I - M_d X|| of the last iterate (inf norm), before any fallback


def _norm(r: torch.Tensor) -> torch.Tensor:
    """[groups] induced infinity norm (max absolute row sum); NaN propagates."""
    return r.abs().sum(-1).amax(-1)


def _newton_schulz(m, damping, previous, tolerance, max_iterations, blocks, gemm) -> NewtonSchulzResult:
    if m.dim() != 3 or m.shape[1] != m.shape[2]:
        raise ValueError(f"m must be [groups, d, d]; got {tuple(m.shape)}")
    if previous is not None and previous.shape != m.shape:
        raise ValueError(f"previous must have m's shape {tuple(m.shape)}; got {tuple(previous.shape)}")
    groups, d = m.shape[0], m.shape[-1]
    device = m.device
    work = torch.float64 if m.dtype == torch.float64 else torch.float32
    tolerance = TOLERANCE[work] if tolerance is None else float(tolerance)
    if groups == 0 or d == 0:
        none = torch.zeros(groups, dtype=torch.bool, device=device)
        return NewtonSchulzResult(m.clone(), none, ~none, none, none.long(), none.to(work))
    eye = torch.eye(d, dtype=work, device=device)
    damped, damping, finite = safe_damped(m.to(work), damping)

    def matmul(a, b, addend=None, alpha=1.0, shift=0.0):
        return gemm(a, b, addend, alpha, 1.0, shift, blocks)

    # The safe start I / ||M_d||: R_0 = I - M_d / ||M_d|| costs no GEMM.
    norm = _norm(damped)
    scale = torch.where((norm > 0) & torch.isfinite(norm), 1.0 / norm, torch.ones_like(norm))[:, None, None]
    x = scale * eye.expand(groups, d, d)
    r = eye - scale * damped
    warm = torch.zeros(groups, dtype=torch.bool, device=device)
    if previous is not None and groups:
        prev = previous.to(device=device, dtype=work)
        usable = finite & finite_per_group(prev)
        prev = torch.where(usable[:, None, None], prev, torch.zeros_like(prev))
        r_prev = matmul(damped, prev, alpha=-1.0, shift=1.0)
        warm = usable & (_norm(r_prev) < 1)
        x = torch.where(warm[:, None, None], prev, x)
        r = torch.where(warm[:, None, None], r_prev, r)
    x, r = x.contiguous(), r.contiguous()
    residual = _norm(r)
    iterations = torch.zeros(groups, dtype=torch.int64, device=device)
    active = finite & ~(residual <= tolerance)
    for _ in range(max_iterations):
        index = active.nonzero().squeeze(1)
        if index.numel() == 0:
            break
        whole = index.numel() == groups
        xa, ra, ma, res = (x, r, damped, residual) if whole else (x[index], r[index], damped[index], residual[index])
        x_new = matmul(xa, ra, addend=xa)  # X + X (I - M_d X) = X (2I - M_d X)
        r_new = matmul(ma, x_new, alpha=-1.0, shift=1.0)  # I - M_d X_new = (I - M_d X)^2
        res_new = _norm(r_new)
        sane = torch.isfinite(res_new)
        take = sane & ((res >= 1) | (res_new < res))  # below 1, only an improvement replaces the iterate
        stalled = ~sane | ((res < 1) & (res_new > 0.5 * (res + res * res)))
        x_next = torch.where(take[:, None, None], x_new, xa)
        r_next = torch.where(take[:, None, None], r_new, ra)
        res_next = torch.where(take, res_new, res)
        going = ~stalled & ~(res_next <= tolerance)
        if whole:
            x, r, residual, active = x_next, r_next, res_next, going
        else:
            x[index], r[index], residual[index], active[index] = x_next, r_next, res_next, going
        iterations[index] += 1

    converged = finite & (residual <= tolerance) & finite_per_group(x)
    inverse = x
    ok = converged
    fallback = finite & ~converged
    if bool(fallback.any()):
        again, ok_again = cholesky_inverse(damped[fallback])
        inverse = inverse.clone()
        inverse[fallback] = again
        ok = ok.clone()
        ok[fallback] = ok_again
    failed = ~ok
    if bool(failed.any()):
        inverse = torch.where(failed[:, None, None], damping_inverse(damping)[:, None, None] * eye, inverse)
    inverse = inverse.to(m.dtype)
    if inverse.dtype != work:  # an entry beyond bf16/fp16 range becomes the largest finite value
        inverse = torch.nan_to_num(inverse)
    return NewtonSchulzResult(inverse, failed, converged, warm, iterations, residual)


def newton_schulz_triton(m: torch.Tensor, damping: torch.Tensor | float, previous: torch.Tensor | None = None,
                         tolerance: float | None = None, max_iterations: int = MAX_ITERATIONS,
                         blocks: tuple[int, int, int] = BLOCKS) -> NewtonSchulzResult:
    """(M + damping I)^-1 per group of m [groups, d, d] by Newton-Schulz on the Triton GEMM, with the report.

    Args:
        m: symmetric PSD factors [groups, d, d] (float32/bf16/fp16 iterate in float32, float64 in float64).
        damping: a scalar or one value per group (added to the diagonal; negative counts as 0).
        previous: the last inverses [groups, d, d] to start from (ignored per group unless finite with
            ||I - M_d previous|| < 1).
        tolerance: stop at ||I - M_d X||_inf <= tolerance (None: ``TOLERANCE`` of the working dtype).
        max_iterations: Newton-Schulz steps at most; groups left over are inverted by Cholesky.
        blocks: the GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K).
    """
    return _newton_schulz(m, damping, previous, tolerance, max_iterations, blocks, batched_gemm_triton)


def newton_schulz_reference(m: torch.Tensor, damping: torch.Tensor | float, previous: torch.Tensor | None = None,
                            tolerance: float | None = None, max_iterations: int = MAX_ITERATIONS,
                            blocks: tuple[int, int, int] = BLOCKS) -> NewtonSchulzResult:
    """``newton_schulz_triton`` with torch matmuls (``blocks`` is ignored)."""
    return _newton_schulz(m, damping, previous, tolerance, max_iterations, blocks, batched_gemm_reference)


def newton_schulz(m: torch.Tensor, damping: torch.Tensor | float, previous: torch.Tensor | None = None,
                  tolerance: float | None = None, max_iterations: int = MAX_ITERATIONS,
                  blocks: tuple[int, int, int] = BLOCKS, backend: str = "auto") -> NewtonSchulzResult:
    """``newton_schulz_triton`` or ``newton_schulz_reference``, as ``use_triton`` picks."""
    run = newton_schulz_triton if use_triton(backend, m, "inverse") else newton_schulz_reference
    return run(m, damping, previous, tolerance, max_iterations, blocks)


def damped_inverse_ns_triton(m: torch.Tensor, damping: torch.Tensor | float, previous: torch.Tensor | None = None,
                             tolerance: float | None = None, max_iterations: int = MAX_ITERATIONS,
                             blocks: tuple[int, int, int] = BLOCKS) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse in m's dtype, failed [groups] bool), the contract of runtime/inverse.py's ``damped_inverse``,
    by Newton-Schulz on the Triton GEMM (see ``newton_schulz_triton`` for the arguments)."""
    result = newton_schulz_triton(m, damping, previous, tolerance, max_iterations, blocks)
    return result.inverse, result.failed


def damped_inverse_ns_reference(m: torch.Tensor, damping: torch.Tensor | float,
                                previous: torch.Tensor | None = None, tolerance: float | None = None,
                                max_iterations: int = MAX_ITERATIONS,
                                blocks: tuple[int, int, int] = BLOCKS) -> tuple[torch.Tensor, torch.Tensor]:
    """``damped_inverse_ns_triton`` with torch matmuls."""
    result = newton_schulz_reference(m, damping, previous, tolerance, max_iterations, blocks)
    return result.inverse, result.failed


def damped_inverse_ns(m: torch.Tensor, damping: torch.Tensor | float, previous: torch.Tensor | None = None,
                      tolerance: float | None = None, max_iterations: int = MAX_ITERATIONS,
                      blocks: tuple[int, int, int] = BLOCKS, backend: str = "auto"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M + damping I)^-1 per group and the failed groups, on the backend ``use_triton`` picks."""
    run = damped_inverse_ns_triton if use_triton(backend, m, "inverse") else damped_inverse_ns_reference
    return run(m, damping, previous, tolerance, max_iterations, blocks)
