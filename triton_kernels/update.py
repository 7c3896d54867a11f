"""The preconditioned update, fused: delta = scale G^-1 V A^-1 + momentum previous + weight_decay param, then
param += lr delta and previous <- delta, per group of layers of one size.

Why: in torch the update is two matmuls and then separate elementwise passes over weight-sized tensors (scale,
add the momentum term, add the decay term, add into the weights, keep delta for the next step), each reading
and writing the whole layer again. Here the second GEMM's epilogue does all of that on the output tile while
it is still in registers: previous and param are read once and written once, delta is never materialised
apart from ``previous`` (or the returned tensor when there is no ``previous``).

Layout: V [groups, out, in] (a layer's gradient, the bias column included), G^-1 [groups, out, out], A^-1
[groups, in, in], previous and param [groups, out, in]; any strides (a transposed view is free). One kernel,
launched twice on grid (group, row tile, column tile): first T = V A^-1 into a float32 (float64) [groups, out, in]
scratch with no epilogue, then G^-1 T with the epilogue, each program looping over K in BLOCK_K steps of
tl.dot with masked edges. It is not ``inverse.batched_gemm``: that one needs one dtype for both operands and
rounds its output to it, while the update takes bf16/fp16 gradients beside float32 inverses and must keep T
in float32 (a bf16 T would round the direction twice). Accumulation is float32 (float64 when an operand is
float64): 16-bit operand pairs of one dtype go to tl.dot as they are, mixed pairs are widened to float32 in
registers, float32 products are IEEE (no TF32). The epilogue reads previous only when momentum is non-zero
and param for the decay only when weight_decay is non-zero (a fresh momentum buffer may hold anything), and
rounds once into each tensor's own dtype (param + lr delta is formed in float32, then stored).

The runtime calls it where its semantics are K-FAC's exactly: the heavy-ball update without re-scaling
(``KFAC(rescale=False)``, scale = -lr, lr = 1 here, weight_decay = 0 as eta W is already in V) of a bias-free
layer whose W_bar is a view of its weight, where the dispatch picks Triton (``runtime/fused_step.py``;
tests/test_kernels_fused_step.py). Re-scaled K-FAC and layers with a bias stay on torch.

``tests/test_kernels_update.py`` proves, under TRITON_INTERPRET=1 on CPU (and compiled on CUDA when present),
against a float64 G^-1 V A^-1 and epilogue written in the test: sizes that are not multiples of the 16-wide
test tiles, one and three groups, each of the momentum and decay terms on and off, write on and off, the
in-place results of param and previous with the memory around them untouched and the operands unchanged;
bf16/fp16 gradients with bf16 or float32 inverses and bf16 weights (T kept in float32: a 16-bit T would fail
the check); float64 operands to float64 accuracy (on CUDA this also proves the coefficients arrive as float64);
transposed and group-broadcast views; a NaN in a buffer that momentum 0 must not read; kernel equal to
reference; the argument checks; and the dispatch (the reference on CPU, also on the meta device).
"""

from __future__ import annotations

import torch

from .dispatch import interpreting, use_triton
from .tiles import tile_product

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference works without Triton; dispatch never picks the kernel then
    triton = None

#: GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K) on a GPU; each a power of two, at least 16 (tl.dot).
BLOCKS = (64, 64, 32)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when an operand is float64, else float32: the accumulation and T's dtype."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, past the last byte) that t's elements cover (non-negative strides, as torch makes them)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":  # meta: no memory
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _check(g_inv, v, a_inv, previous, param, momentum, weight_decay, write) -> None:
    # v first: it is checked before the others are compared with it
    named = {"v": v, "g_inv": g_inv, "a_inv": a_inv, "previous": previous, "param": param}
    named = {name: t for name, t in named.items() if t is not None}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [groups, rows, columns] tensor; got {shape}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} is {t.dtype}; the update takes {', '.join(map(str, DTYPES))}")
        if t.device != v.device:
            raise ValueError(f"{name} is on {t.device}, v on {v.device}")
    groups, out, inn = v.shape
    wanted = {"g_inv": (groups, out, out), "a_inv": (groups, inn, inn), "previous": (groups, out, inn),
              "param": (groups, out, inn)}
    for name, shape in wanted.items():
        if name in named and tuple(named[name].shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} for v {list(v.shape)} ([groups, out, in]); "
                             f"got {list(named[name].shape)}")
    if momentum != 0 and previous is None:
        raise ValueError(f"momentum={momentum} needs previous (the last delta)")
    if weight_decay != 0 and param is None:
        raise ValueError(f"weight_decay={weight_decay} needs param")
    written = {"previous": previous} if previous is not None else {}
    if param is not None and write:
        written["param"] = param
    for name, t in written.items():
        if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
            raise ValueError(f"{name} is written in place and must not be an expanded (stride 0) view")
        for other, u in named.items():
            if other != name and _overlap(t, u):
                raise ValueError(f"{name} is written in place and must not share memory with {other}")


def _delta_dtype(work: torch.dtype, previous: torch.Tensor | None, param: torch.Tensor | None) -> torch.dtype:
    if previous is not None:
        return previous.dtype
    return param.dtype if param is not None else work


def fused_update_reference(
    g_inv: torch.Tensor, v: torch.Tensor, a_inv: torch.Tensor, *, scale: float, previous: torch.Tensor | None = None,
    momentum: float = 0.0, param: torch.Tensor | None = None, weight_decay: float = 0.0, lr: float = 1.0,
    write: bool = True, blocks: tuple[int, int, int] = BLOCKS,
) -> torch.Tensor:
    """``fused_update`` in plain torch (same contract): two matmuls in the working dtype, then the epilogue as
    elementwise passes (``blocks`` is ignored)."""
    _check(g_inv, v, a_inv, previous, param, momentum, weight_decay, write)
    work = _work_dtype(g_inv, v, a_inv)
    delta = float(scale) * torch.matmul(g_inv.to(work), torch.matmul(v.to(work), a_inv.to(work)))
    if momentum != 0:
        delta = delta + float(momentum) * previous.to(work)
    if weight_decay != 0:
        delta = delta + float(weight_decay) * param.to(work)
    if param is not None and write:
        param.copy_(param.to(work) + float(lr) * delta)
    if previous is not None:
        return previous.copy_(delta)
    return delta.to(_delta_dtype(work, previous, param))


if triton is not None:
    # Only Triton builtins (tl.full, not tl.zeros): the interpreter cannot call triton.language's @jit helpers
    # when triton.language was imported before TRITON_INTERPRET was set (see tests/conftest.py).

    @triton.jit
    def _update_kernel(
        a_ptr, b_ptr, out_ptr, prev_ptr, param_ptr,
        M, N, K,
        stride_ag, stride_am, stride_ak,
        stride_bg, stride_bk, stride_bn,
        stride_og, stride_om, stride_on,
        stride_vg, stride_vm, stride_vn,
        stride_pg, stride_pm, stride_pn,
        scale: tl.float64, momentum: tl.float64, weight_decay: tl.float64, lr: tl.float64,
        STORE_OUT: tl.constexpr,
        READ_PREV: tl.constexpr,
        STORE_PREV: tl.constexpr,
        READ_PARAM: tl.constexpr,
        DECAY: tl.constexpr,
        WRITE_PARAM: tl.constexpr,
        WIDEN: tl.constexpr,
        FP64: tl.constexpr,
        PRECISION: tl.constexpr,
        INTERPRETED: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One (BLOCK_M, BLOCK_N) tile of acc = a[g] @ b[g], then delta = scale acc (+ momentum prev)
        (+ weight_decay param); stores delta to out and/or prev, and param + lr delta to param, as told. The
        coefficients are typed float64: Triton would pass a Python float as float32, too coarse for float64
        operands."""
        group = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tile_product(a_ptr, b_ptr, group, rows, cols, M, N, K, stride_ag, stride_am, stride_ak,
                           stride_bg, stride_bk, stride_bn, WIDEN, FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)

        if not INTERPRETED:  # compiled, the coefficients arrive as float64 (see the signature): round them once to
            # acc's dtype (the interpreter passes the Python floats themselves, which numpy treats alike)
            scale = scale.to(acc.dtype)
            momentum = momentum.to(acc.dtype)
            weight_decay = weight_decay.to(acc.dtype)
            lr = lr.to(acc.dtype)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        delta = acc * scale
        prev_ptrs = prev_ptr + group * stride_vg + rows[:, None] * stride_vm + cols[None, :] * stride_vn
        param_ptrs = param_ptr + group * stride_pg + rows[:, None] * stride_pm + cols[None, :] * stride_pn
        if READ_PREV:
            delta += momentum * tl.load(prev_ptrs, mask=inside, other=0.0).to(acc.dtype)
        if READ_PARAM:
            weights = tl.load(param_ptrs, mask=inside, other=0.0).to(acc.dtype)
            if DECAY:
                delta += weight_decay * weights
            if WRITE_PARAM:
                tl.store(param_ptrs, (weights + lr * delta).to(param_ptr.dtype.element_ty), mask=inside)
        if STORE_PREV:
            tl.store(prev_ptrs, delta.to(prev_ptr.dtype.element_ty), mask=inside)
        if STORE_OUT:
            out_ptrs = out_ptr + group * stride_og + rows[:, None] * stride_om + cols[None, :] * stride_on
            tl.store(out_ptrs, delta.to(out_ptr.dtype.element_ty), mask=inside)


def _gemm_flags(a: torch.Tensor, b: torch.Tensor, work: torch.dtype) -> dict:
    widen = a.dtype != b.dtype or (interpreting() and torch.bfloat16 in (a.dtype, b.dtype))
    ieee = widen or a.dtype in (torch.float32, torch.float64)  # ignored by tl.dot for 16-bit operands
    return dict(WIDEN=widen, FP64=work == torch.float64, PRECISION="ieee" if ieee else "tf32",
                INTERPRETED=interpreting())


def fused_update_triton(
    g_inv: torch.Tensor, v: torch.Tensor, a_inv: torch.Tensor, *, scale: float, previous: torch.Tensor | None = None,
    momentum: float = 0.0, param: torch.Tensor | None = None, weight_decay: float = 0.0, lr: float = 1.0,
    write: bool = True, blocks: tuple[int, int, int] = BLOCKS,
) -> torch.Tensor:
    """``fused_update`` by the Triton kernel (same contract): T = V A^-1 in float32, then G^-1 T with the
    epilogue fused. ``blocks`` = (BLOCK_M, BLOCK_N, BLOCK_K) of both launches."""
    if triton is None:
        raise RuntimeError("the fused update kernel needs the triton package (pip install triton)")
    _check(g_inv, v, a_inv, previous, param, momentum, weight_decay, write)
    block_m, block_n, block_k = blocks
    if min(blocks) < 16 or any(x & (x - 1) for x in blocks):
        raise ValueError(f"blocks={blocks}: each must be a power of two >= 16 (tl.dot)")
    groups, out, inn = v.shape
    work = _work_dtype(g_inv, v, a_inv)
    delta = previous if previous is not None else torch.empty(groups, out, inn, device=v.device,
                                                               dtype=_delta_dtype(work, previous, param))
    if delta.numel() == 0:
        return delta
    grid = (groups, triton.cdiv(out, block_m), triton.cdiv(inn, block_n))
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    none = (0, 0, 0)

    t = torch.empty(groups, out, inn, device=v.device, dtype=work)
    _update_kernel[grid](
        v, a_inv, t, t, t, out, inn, inn,
        *v.stride(), *a_inv.stride(), *t.stride(), *none, *none,
        1.0, 0.0, 0.0, 0.0,
        STORE_OUT=True, READ_PREV=False, STORE_PREV=False, READ_PARAM=False, DECAY=False, WRITE_PARAM=False,
        **_gemm_flags(v, a_inv, work), **tiles,
    )
    write_param = param is not None and bool(write)
    read_param = weight_decay != 0 or write_param
    weights = param if param is not None else t
    _update_kernel[grid](
        g_inv, t, delta, delta, weights, out, inn, out,
        *g_inv.stride(), *t.stride(), *delta.stride(), *delta.stride(),
        *(weights.stride() if read_param else none),
        float(scale), float(momentum), float(weight_decay), float(lr),
        STORE_OUT=previous is None, READ_PREV=bool(momentum != 0), STORE_PREV=previous is not None,
        READ_PARAM=read_param, DECAY=bool(weight_decay != 0), WRITE_PARAM=write_param,
        **_gemm_flags(g_inv, t, work), **tiles,
    )
    return delta


def fused_update(
    g_inv: torch.Tensor, v: torch.Tensor, a_inv: torch.Tensor, *, scale: float, previous: torch.Tensor | None = None,
    momentum: float = 0.0, param: torch.Tensor | None = None, weight_decay: float = 0.0, lr: float = 1.0,
    write: bool = True, blocks: tuple[int, int, int] = BLOCKS, backend: str = "auto",
) -> torch.Tensor:
    """delta = scale G^-1 V A^-1 + momentum previous + weight_decay param per group; param += lr delta and
    previous <- delta in place; returns delta.

    Args:
        g_inv: [groups, out, out] the output-gradient factors' inverses.
        v: [groups, out, in] the layers' gradients (bias column included); any of float32/bf16/fp16/float64,
            like every tensor here, in any strides.
        a_inv: [groups, in, in] the input factors' inverses.
        scale: the coefficient of G^-1 V A^-1 (e.g. -1, or a re-scaling coefficient).
        previous: [groups, out, in] the last delta; overwritten with this one, and then returned itself. Read
            only when momentum is non-zero (momentum 0 initialises a fresh buffer whatever it holds).
        momentum: the coefficient of previous (non-zero needs previous).
        param: [groups, out, in] the weights: read for the decay term (only when weight_decay is non-zero) and
            updated in place by lr delta when write is true, rounded once to param's dtype.
        weight_decay: the coefficient of param in delta (non-zero needs param).
        lr: the step length of the param write (delta itself does not include it).
        write: whether to write param (False: param only feeds the decay term).
        blocks: the kernel's tiles (BLOCK_M, BLOCK_N, BLOCK_K); the reference ignores them.
        backend: "auto" runs the kernel on CUDA tensors and the reference elsewhere, "triton" demands the
            kernel (the interpreter on a CPU tensor), "torch" the reference (``dispatch.use_triton``).

    Returns:
        delta [groups, out, in]: ``previous`` when given, else a new tensor in param's dtype when param is given,
        else in the working dtype (float64 when an operand is float64, else float32).
    """
    run = fused_update_triton if use_triton(backend, v, "update") else fused_update_reference
    return run(g_inv, v, a_inv, scale=scale, previous=previous, momentum=momentum, param=param,
               weight_decay=weight_decay, lr=lr, write=write, blocks=blocks)
