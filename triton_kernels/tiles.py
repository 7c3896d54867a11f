"""The GEMM tile loop that the batched GEMM (``inverse``) and the fused update (``update``) share.

One (BLOCK_M, BLOCK_N) tile of a[g] @ b[g]: masked loads of BLOCK_K-wide panels (ragged edges read as 0), any
strides, accumulation by tl.dot in float32 (float64 with ``FP64``). ``WIDEN`` converts the panels to the
accumulator's dtype first: operands of two dtypes, or bf16 in the interpreter, which keeps bf16 as raw uint16
bits and would multiply those. The accumulator starts from tl.full, a builtin, not tl.zeros (a @jit helper of
triton.language.standard): the interpreter can only patch helpers created after TRITON_INTERPRET was set, and
tests/conftest.py imports torchvision, which imports triton.language, before it sets the variable.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels' modules keep their torch references without Triton
    triton = None

if triton is not None:

    @triton.jit
    def tile_product(
        a_ptr, b_ptr, group, rows, cols,
        M, N, K,
        stride_ag, stride_am, stride_ak,
        stride_bg, stride_bk, stride_bn,
        WIDEN: tl.constexpr,
        FP64: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """acc = a[group][rows, :] @ b[group][:, cols] for one tile (rows/cols may run past M/N: masked)."""
        inner = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + group * stride_ag + rows[:, None] * stride_am + inner[None, :] * stride_ak
        b_ptrs = b_ptr + group * stride_bg + inner[:, None] * stride_bk + cols[None, :] * stride_bn
        if FP64:
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float64)
        else:
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            left = K - start
            a = tl.load(a_ptrs, mask=(rows[:, None] < M) & (inner[None, :] < left), other=0.0)
            b = tl.load(b_ptrs, mask=(inner[:, None] < left) & (cols[None, :] < N), other=0.0)
            if WIDEN:
                a = a.to(acc.dtype)
                b = b.to(acc.dtype)
            if FP64:  # tl.dot's out_dtype defaults to float32; compiled (not interpreted) it must match acc's
                acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float64)
            else:
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        return acc
