"""Factor statistics: out <- beta out + alpha X~^T X~ per group, X~ = [X, 1] with the homogeneous column.

Why a kernel: K-FAC's A and G factors are an EMA of Grams of the layers' input rows (with a ones column for
the bias) and output-gradient rows. In torch that is a concatenated copy of the rows, a full X^T X (both
triangles of a symmetric result), a separate EMA pass over the factor and a mirror pass to make it exactly
symmetric (``runtime.factors.accumulate_grams``). The kernel reads the rows once per tile pair, computes
only the tiles on and above the diagonal (about half the products), appends the ones column virtually
(never materialised), accumulates in float32 from float32, bfloat16 or float16 rows, and fuses the EMA
and the mirror into the one store of each tile.

Layout: rows [groups, R, d] (any strides: the transposed views of ``runtime.factors.site_rows`` need no
copy), out [groups, D, D] float32 with D = d + 1 when homogeneous else d. The grid is (tile pairs, groups):
program p of axis 0 takes the BLOCK_D x BLOCK_D tile (i, j), i <= j, numbered column by column
(p = j (j + 1) / 2 + i), so that neighbouring programs share their column block of rows; axis 1 is the
group, so the layers of one size are stacked into one launch. Each program loops over R in BLOCK_R rows,
adds tl.dot(X~[:, i]^T, X~[:, j]) into a float32 accumulator, then writes beta out[i, j] + alpha acc to
(i, j) and its transpose to (j, i) (on a diagonal tile, the upper half to itself and its transpose to the
lower half), so the result is exactly symmetric. Only the upper triangle of out is read, and not at all
when beta = 0 (whatever out held, NaN included, is ignored).

Tests (tests/test_kernels_statistics.py) run the kernel under Triton's CPU interpreter against a float64
X~^T X~ written in the test: sizes that are not multiples of the blocks (several tiles), R = 1, homogeneous
on and off, one and several groups, beta 0 over NaN, a two-call EMA, bfloat16/float16 rows, strided rows,
exact symmetry, the reference against the kernel and the dispatch; on a CUDA device the same checks run on
the compiled kernel. The interpreter stores bfloat16 as raw 16-bit integers, so there the bfloat16 tiles are
widened to float32 before tl.dot (the same exact products, the same float32 sums); the bfloat16 tl.dot itself
is proven by the CUDA test only.
"""

from __future__ import annotations

import torch

from .dispatch import interpreting, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference works without Triton; dispatch never picks the kernel then
    triton = None

#: Default tiles for a GPU: BLOCK_D x BLOCK_D output tiles, BLOCK_R rows per step of the reduction.
BLOCK_D = 64
BLOCK_R = 32
ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def factor_update_(
    out: torch.Tensor, rows: torch.Tensor, alpha: float, beta: float, homogeneous: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """out <- beta out + alpha X~^T X~ per group, in place, exactly symmetric; returns out.

    Args:
        out: [groups, D, D] float32 (float64 too on the torch reference); only its upper triangle is read,
            and nothing when beta is 0.
        rows: X [groups, R, d], float32, bfloat16 or float16 (float64 too on the reference), any strides.
        alpha, beta: the scales (beta 0 replaces out; an EMA is alpha = (1 - decay) / m, beta = decay).
        homogeneous: X~ = [X, 1] (a ones column appended virtually, D = d + 1) instead of X (D = d).
        backend: "auto" runs the Triton kernel on CUDA tensors (float32 out) and the reference elsewhere,
            "triton" demands the kernel (the interpreter on a CPU tensor), "torch" the reference.
    """
    if use_triton(backend, rows, "statistics") and (backend == "triton" or out.dtype == torch.float32):
        return factor_update_triton(out, rows, alpha, beta, homogeneous)
    return factor_update_reference(out, rows, alpha, beta, homogeneous)


def _check(out: torch.Tensor, rows: torch.Tensor, homogeneous: bool, out_dtypes: tuple, row_dtypes: tuple) -> None:
    if rows.dim() != 3:
        raise ValueError(f"rows must be [groups, R, d]; got shape {tuple(rows.shape)}")
    groups, _, d = rows.shape
    size = d + 1 if homogeneous else d
    if tuple(out.shape) != (groups, size, size):
        raise ValueError(f"out must be [groups, D, D] = {[groups, size, size]} for rows {tuple(rows.shape)} "
                         f"(homogeneous={homogeneous}); got {tuple(out.shape)}")
    if out.dtype not in out_dtypes:
        raise ValueError(f"out is {out.dtype}; this backend accumulates into {', '.join(map(str, out_dtypes))}")
    if rows.dtype not in row_dtypes:
        raise ValueError(f"rows are {rows.dtype}; this backend reads {', '.join(map(str, row_dtypes))}")
    if out.device != rows.device:
        raise ValueError(f"out is on {out.device}, rows on {rows.device}")


def factor_update_reference(
    out: torch.Tensor, rows: torch.Tensor, alpha: float, beta: float, homogeneous: bool = False,
) -> torch.Tensor:
    """The torch way of ``factor_update_`` (same contract): accumulates in out's dtype (float32 or float64),
    concatenates the ones column, and copies the upper triangle onto the lower one."""
    _check(out, rows, homogeneous, (torch.float32, torch.float64), ROW_DTYPES + (torch.float64,))
    x = rows.to(out.dtype)
    if homogeneous:
        x = torch.cat([x, x.new_ones(x.shape[0], x.shape[1], 1)], dim=2)
    # baddbmm ignores its input when beta is 0 (NaN included); only the upper triangle is kept.
    upper = torch.baddbmm(out, x.transpose(1, 2), x, beta=beta, alpha=alpha).triu()
    return out.copy_(upper + upper.triu(1).transpose(1, 2))


def factor_update_triton(
    out: torch.Tensor, rows: torch.Tensor, alpha: float, beta: float, homogeneous: bool = False,
) -> torch.Tensor:
    """The Triton kernel of ``factor_update_`` (same contract; float32 out), with the default tiles."""
    return _launch(out, rows, alpha, beta, homogeneous, block_d=BLOCK_D, block_r=BLOCK_R)


def _launch(
    out: torch.Tensor, rows: torch.Tensor, alpha: float, beta: float, homogeneous: bool, *,
    block_d: int, block_r: int, num_warps: int = 4, num_stages: int = 3,
) -> torch.Tensor:
    """``factor_update_triton`` with the tiles chosen (powers of 2, at least 16 for tl.dot)."""
    if triton is None:
        raise RuntimeError("the factor statistics kernel needs the triton package (pip install triton)")
    _check(out, rows, homogeneous, (torch.float32,), ROW_DTYPES)
    for name, block in (("block_d", block_d), ("block_r", block_r)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name}={block}: a power of 2, at least 16")
    groups, count, d = rows.shape
    size = out.shape[-1]
    alpha, beta = float(alpha), float(beta)
    tiles = triton.cdiv(size, block_d)
    if groups == 0 or size == 0:
        return out
    _factor_update_kernel[(tiles * (tiles + 1) // 2, groups)](
        out, rows, count, d, size, alpha, beta,
        out.stride(0), out.stride(1), out.stride(2), rows.stride(0), rows.stride(1), rows.stride(2),
        HOMOGENEOUS=bool(homogeneous), BETA_ZERO=beta == 0.0,
        UPCAST=_INTERPRETED and rows.dtype == torch.bfloat16,
        # float32 rows: full float32 products (not TF32), like torch's matmuls by default; ignored for 16-bit rows
        PRECISION="ieee" if rows.dtype == torch.float32 else "tf32",
        BLOCK_D=block_d, BLOCK_R=block_r, num_warps=num_warps, num_stages=num_stages,
    )
    return out


#: Whether the kernel below runs in Triton's CPU interpreter (TRITON_INTERPRET read as it is defined).
_INTERPRETED = triton is not None and interpreting()

if triton is not None:
    # The kernel calls only Triton's builtins, none of the @triton.jit helpers of triton.language.standard
    # (tl.zeros, tl.cdiv, ...): when triton was imported before TRITON_INTERPRET was set, those helpers are
    # compiled-mode functions that the interpreter refuses to call.

    @triton.jit
    def _factor_update_kernel(
        out_ptr, x_ptr, R, d, D, alpha, beta,
        stride_og, stride_oi, stride_oj, stride_xg, stride_xr, stride_xc,
        HOMOGENEOUS: tl.constexpr, BETA_ZERO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # Tile pair (ti, tj), ti <= tj, from p = tj (tj + 1) / 2 + ti: the float square root can be one off
        # for large p, the two corrections make it exact.
        pair = tl.program_id(0)
        group = tl.program_id(1).to(tl.int64)
        tj = ((tl.sqrt(8.0 * pair.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
        tj = tl.where(tj * (tj + 1) // 2 > pair, tj - 1, tj)
        tj = tl.where((tj + 1) * (tj + 2) // 2 <= pair, tj + 1, tj)
        ti = pair - tj * (tj + 1) // 2

        offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
        x_base = x_ptr + group * stride_xg
        acc = tl.full((BLOCK_D, BLOCK_D), 0.0, tl.float32)  # (not tl.zeros: see the note above the kernel)
        for start in range(0, R, BLOCK_R):
            offs_r = start + tl.arange(0, BLOCK_R)
            in_rows = offs_r < R
            row_offsets = offs_r.to(tl.int64)[:, None] * stride_xr
            left = tl.load(x_base + row_offsets + offs_i[None, :] * stride_xc,
                           mask=in_rows[:, None] & (offs_i[None, :] < d), other=0.0)
            right = tl.load(x_base + row_offsets + offs_j[None, :] * stride_xc,
                            mask=in_rows[:, None] & (offs_j[None, :] < d), other=0.0)
            if UPCAST:  # the interpreter keeps bfloat16 as raw uint16 that its tl.dot would multiply as integers
                left = left.to(tl.float32)
                right = right.to(tl.float32)
            if HOMOGENEOUS:  # column d is the ones column: 1 on the rows that exist (the load left 0 there)
                left += (in_rows[:, None] & (offs_i[None, :] == d)).to(left.dtype)
                right += (in_rows[:, None] & (offs_j[None, :] == d)).to(right.dtype)
            acc = tl.dot(tl.trans(left), right, acc, input_precision=PRECISION)

        out_base = out_ptr + group * stride_og
        inside = (offs_i[:, None] < D) & (offs_j[None, :] < D)
        upper = inside & (offs_i[:, None] <= offs_j[None, :])
        strictly_upper = inside & (offs_i[:, None] < offs_j[None, :])
        here = out_base + offs_i[:, None] * stride_oi + offs_j[None, :] * stride_oj
        mirrored = out_base + offs_j[None, :] * stride_oi + offs_i[:, None] * stride_oj
        if BETA_ZERO:
            value = alpha * acc
        else:
            value = beta * tl.load(here, mask=upper, other=0.0) + alpha * acc
        tl.store(here, value, mask=upper)
        tl.store(mirrored, value, mask=strictly_upper)
