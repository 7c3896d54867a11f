"""The KFC A factor of a convolution straight from its input feature map: implicit patches, no im2col.

Why: KFC's A = (1/m) sum over examples and output locations of p p^T, p the patch (runtime/patches.py)
of one output location. The usual way (and the runtime's own, ``conv_patches`` + ``accumulate_grams``)
materialises the unfold tensor [N * T, C * kh * kw], kh * kw times the feature map, then multiplies it by
itself; ASDL's profiling found im2col to be the bottleneck of conv statistics. Here no patch tensor exists
in memory: each program computes one tile of A for one group and loads the patch entries it needs from
x itself, by index arithmetic.

Index scheme (conv1d is conv2d with a height of 1). Rows r = (example n, output location t), example-major,
t row-major over the [OH, OW] output grid: n = r // T, oh = (r % T) // OW, ow = r % OW. Columns j of group
g in the F.unfold order (channel-major, then kernel offsets row-major): c = g * C/groups + j // (kh kw),
ki = (j % (kh kw)) // kw, kj = j % kw; the entry is x[n, c, oh sh - ph + ki dh, ow sw - pw + kj dw], zero
outside the input (the padding), and column j = C/groups * kh * kw is the homogeneous 1 when asked for
(appended virtually, no concatenated copy). ph, pw are the begin pads; the end pads only set OH, OW.

Tiling. Program (i, j, g [, split]) with i <= j owns the [BLOCK_D, BLOCK_D] tile (i, j) of group g: it
loops over blocks of BLOCK_ROWS rows, loads the two panels [BLOCK_D, BLOCK_ROWS] and [BLOCK_ROWS, BLOCK_D]
by the index arithmetic above (masked loads, x in float32, bfloat16 or float16, any strides) and adds
their tl.dot to a float32 accumulator (input_precision "ieee" for float32 inputs: no TF32 rounding;
half inputs go to the tensor cores as they are, their products exact in float32; in the interpreter the
panels are first cast to float32, as its dot would multiply bfloat16's raw bits). The
epilogue writes beta * out + alpha * acc to tile (i, j) and the same values to tile (j, i): the result is
exactly symmetric, only the upper triangle of ``out`` is read, and beta = 0 never reads ``out`` (NaN in
it is ignored). Programs below the diagonal return at once. With few tiles and many rows (a large batch
of small feature maps) the rows are split over ``splits`` programs per tile, whose partial Grams are
summed by torch before the epilogue (fixed order, deterministic).

Tests (tests/test_kernels_conv_statistics.py, Triton's interpreter on CPU, the compiled kernel on CUDA
when present): the kernel and the reference equal a float64 F.unfold computation written in the test for
strides, padding, dilation, groups, conv1d, asymmetric pads, homogeneous on/off, sizes that are not
multiples of the blocks, split rows and non-contiguous inputs (the test's patches are first checked to
reproduce F.conv1d/F.conv2d); beta = 0 ignores NaN in ``out``; two calls make the EMA and read only the
upper triangle; bfloat16 and float16 inputs; exact symmetry; dispatch; and the runtime's own A factor of a
captured nn.Conv2d (strided grouped with bias; "same" asymmetric dilated) equals the kernel's result with
alpha = 1/m. The interpreter proves the arithmetic; with CUDA the same tests run the compiled kernel on
the GPU, plus a larger one at the default blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kronograph.triton_kernels.dispatch import interpreting, use_triton

try:  # the kernel is defined only where Triton is installed; the reference needs torch alone
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None
    tl = None


# -- geometry ------------------------------------------------------------------------------------------
def _tuple(value: int | Sequence[int], rank: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (int(value),) * rank
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * rank
    if len(value) != rank:
        raise ValueError(f"{name}={value} does not fit a conv{rank}d")
    return value


def _pads(padding: int | Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(begin, end) pads from an int, one pad per axis (symmetric) or ConvGeometry's ONNX order
    (the begin pads of every spatial axis, then the end pads)."""
    if isinstance(padding, str):
        raise ValueError(f"padding={padding!r}: resolve it first (geometry_arguments does for a ConvGeometry)")
    if not isinstance(padding, int) and len(padding) == 2 * rank:
        pads = tuple(int(p) for p in padding)
        return pads[:rank], pads[rank:]
    pads = _tuple(padding, rank, "padding")
    return pads, pads


def geometry_arguments(geometry: Any, spatial: Sequence[int]) -> dict[str, Any]:
    """The geometry keywords of ``conv_factor_update_`` for a runtime ConvGeometry applied to an input of
    spatial shape ``spatial`` (ONNX auto_pad resolved as runtime/patches.py does)."""
    from kronograph.runtime.patches import resolve_pads  # here: the runtime imports this module

    begin, end = resolve_pads(geometry, spatial)
    return dict(kernel_size=tuple(geometry.kernel), stride=tuple(geometry.stride), padding=(*begin, *end),
                dilation=tuple(geometry.dilation), groups=int(geometry.groups))


class _Geometry:
    """A conv1d/conv2d call as a conv2d one: everything the kernel and the reference need."""

    def __init__(self, x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int, homogeneous: bool):
        if x.dim() not in (3, 4):
            raise ValueError(f"conv_factor_update_ handles conv1d [N, C, L] and conv2d [N, C, H, W] inputs, "
                             f"got shape {tuple(x.shape)}")
        rank = x.dim() - 2
        kernel = _tuple(kernel_size, rank, "kernel_size")
        stride, dilation = _tuple(stride, rank, "stride"), _tuple(dilation, rank, "dilation")
        begin, end = _pads(padding, rank)
        if rank == 1:  # a height of 1: kernel 1, stride 1, no pads along it
            kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
            begin, end = (0, *begin), (0, *end)
        n, c = x.shape[:2]
        if groups < 1 or c % groups:
            raise ValueError(f"{c} input channels do not split into groups={groups}")
        self.rank, self.groups = rank, int(groups)
        self.kernel, self.stride, self.dilation, self.begin, self.end = kernel, stride, dilation, begin, end
        self.spatial = (1, *x.shape[2:]) if rank == 1 else tuple(x.shape[2:])
        self.out = tuple((size + b + e - d * (k - 1) - 1) // s + 1
                         for size, b, e, k, s, d in zip(self.spatial, begin, end, kernel, stride, dilation))
        if min(self.out) < 1:
            raise ValueError(f"the convolution has no output location (input {self.spatial}, kernel {kernel})")
        self.channels = c // groups
        self.features = self.channels * kernel[0] * kernel[1]
        self.dim = self.features + bool(homogeneous)
        self.rows = n * self.out[0] * self.out[1]

    def check_out(self, out: torch.Tensor) -> None:
        shape = (self.groups, self.dim, self.dim)
        if tuple(out.shape) != shape or out.dtype != torch.float32:
            raise ValueError(f"out must be float32 of shape {shape}, got {out.dtype} {tuple(out.shape)}")


# -- the torch reference -------------------------------------------------------------------------------
def _upper_symmetric(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``matrix``'s (exactly symmetric)."""
    upper = torch.triu(matrix)
    return upper + torch.triu(matrix, 1).transpose(-1, -2)


def _epilogue_(out: torch.Tensor, gram: torch.Tensor, beta: float) -> torch.Tensor:
    """out <- beta * sym(upper(out)) + sym(upper(gram)); beta = 0 never reads out."""
    gram = _upper_symmetric(gram)
    if beta == 0:
        return out.copy_(gram)
    return out.copy_(_upper_symmetric(out).mul_(beta).add_(gram))


def conv_factor_update_reference(
    out: torch.Tensor,
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    homogeneous: bool = False,
    alpha: float = 1.0,
    beta: float = 0.0,
    block_rows: int = 64,
    block_d: int = 64,
    splits: int | None = None,
) -> torch.Tensor:
    """``conv_factor_update_`` the plain way: F.unfold (the im2col tensor) and a batched matmul in float32.
    ``block_rows``, ``block_d`` and ``splits`` tune the kernel only (accepted for the same signature)."""
    geo = _Geometry(x, kernel_size, stride, padding, dilation, groups, homogeneous)
    geo.check_out(out)
    x = x.to(device=out.device, dtype=torch.float32)
    if geo.rank == 1:
        x = x.unsqueeze(2)
    if geo.begin != geo.end:  # asymmetric pads: zeros first, as the convolution does
        x = F.pad(x, [geo.begin[1], geo.end[1], geo.begin[0], geo.end[0]])
        pads = (0, 0)
    else:
        pads = geo.begin
    cols = F.unfold(x, geo.kernel, dilation=geo.dilation, padding=pads, stride=geo.stride)  # [N, C*K, T]
    p = cols.transpose(1, 2).reshape(-1, geo.groups, geo.features).transpose(0, 1)  # [groups, rows, D0]
    if homogeneous:
        p = torch.cat([p, p.new_ones(geo.groups, p.shape[1], 1)], dim=2)
    gram = torch.bmm(p.transpose(1, 2), p).mul_(alpha)
    return _epilogue_(out, gram, beta)


# -- the Triton kernel ---------------------------------------------------------------------------------
if tl is not None:
    # Note: the kernel calls only Triton builtins (tl.full, not tl.zeros; the tile count is an argument, not
    # tl.cdiv). The @jit helpers of triton.language.standard are wrapped when triton is first imported, and
    # under pytest torch/torchvision import triton before tests/conftest.py sets TRITON_INTERPRET=1: those
    # helpers then refuse to run inside an interpreted kernel ("Cannot call @triton.jit'd outside of the
    # scope of a kernel"); this module itself is imported after the setting, so its kernel is interpreted.

    @triton.jit
    def _conv_gram_kernel(
        x_ptr, out_ptr,
        rows, rows_per_split, features, dim, channels, tiles,
        in_h, in_w, out_h, out_w,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sx_n, sx_c, sx_h, sx_w,
        so_s, so_g, so_r, so_c,
        alpha, beta,
        KH: tl.constexpr, KW: tl.constexpr,
        HOMOGENEOUS: tl.constexpr, READ_OUT: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        tile_i = tl.program_id(0) // tiles
        tile_j = tl.program_id(0) % tiles
        if tile_i > tile_j:  # the lower triangle is written by its mirror program
            return
        group = tl.program_id(1)
        split = tl.program_id(2)

        # the columns of both tiles: channel and kernel offsets, fixed for the whole row loop
        cols_i = tile_i * BLOCK_D + tl.arange(0, BLOCK_D)
        cols_j = tile_j * BLOCK_D + tl.arange(0, BLOCK_D)
        ch_i = group * channels + cols_i // (KH * KW)
        ch_j = group * channels + cols_j // (KH * KW)
        ki_i = ((cols_i % (KH * KW)) // KW) * dil_h
        kj_i = (cols_i % KW) * dil_w
        ki_j = ((cols_j % (KH * KW)) // KW) * dil_h
        kj_j = (cols_j % KW) * dil_w
        real_i = cols_i < features
        real_j = cols_j < features
        one_i = cols_i == features
        one_j = cols_j == features
        chan_i = ch_i.to(tl.int64) * sx_c
        chan_j = ch_j.to(tl.int64) * sx_c

        acc = tl.full((BLOCK_D, BLOCK_D), 0.0, tl.float32)  # builtins only: see the note below
        first = split * rows_per_split
        last = tl.minimum(first + rows_per_split, rows)
        locations = out_h * out_w
        for start in range(first, last, BLOCK_ROWS):
            r = start + tl.arange(0, BLOCK_ROWS)
            live = r < last
            n = r // locations
            t = r % locations
            top = (t // out_w) * stride_h - pad_h
            left = (t % out_w) * stride_w - pad_w
            base = n.to(tl.int64) * sx_n
            # left panel [BLOCK_D, BLOCK_ROWS] (columns of tile i along axis 0), right [BLOCK_ROWS, BLOCK_D]
            h_i = ki_i[:, None] + top[None, :]
            w_i = kj_i[:, None] + left[None, :]
            m_i = (real_i[:, None] & live[None, :] & (h_i >= 0) & (h_i < in_h) & (w_i >= 0) & (w_i < in_w))
            a_i = tl.load(x_ptr + base[None, :] + chan_i[:, None] + h_i * sx_h + w_i * sx_w, mask=m_i, other=0.0)
            h_j = top[:, None] + ki_j[None, :]
            w_j = left[:, None] + kj_j[None, :]
            m_j = (live[:, None] & real_j[None, :] & (h_j >= 0) & (h_j < in_h) & (w_j >= 0) & (w_j < in_w))
            a_j = tl.load(x_ptr + base[:, None] + chan_j[None, :] + h_j * sx_h + w_j * sx_w, mask=m_j, other=0.0)
            if UPCAST:  # the interpreter's dot multiplies bfloat16's raw bits: products in float32 instead
                a_i = a_i.to(tl.float32)
                a_j = a_j.to(tl.float32)
            if HOMOGENEOUS:
                a_i = tl.where(one_i[:, None] & live[None, :], 1.0, a_i).to(a_j.dtype)
                a_j = tl.where(live[:, None] & one_j[None, :], 1.0, a_j).to(a_i.dtype)
            acc = tl.dot(a_i, a_j, acc, input_precision="ieee")

        # epilogue: tile (i, j) and its mirror (j, i) get the same values; diagonal tiles are symmetrised
        in_i = cols_i < dim
        in_j = cols_j < dim
        mask = in_i[:, None] & in_j[None, :]
        base_out = out_ptr + split.to(tl.int64) * so_s + group.to(tl.int64) * so_g
        upper = base_out + cols_i[:, None] * so_r + cols_j[None, :] * so_c
        mirror = base_out + cols_j[None, :] * so_r + cols_i[:, None] * so_c
        result = acc * alpha
        if READ_OUT:
            old = tl.load(upper, mask=mask, other=0.0)
            if tile_i == tile_j:
                old = tl.where(cols_i[:, None] <= cols_j[None, :], old, tl.trans(old))
            result = beta * old + result
        if tile_i == tile_j:
            result = tl.where(cols_i[:, None] <= cols_j[None, :], result, tl.trans(result))
            tl.store(upper, result, mask=mask)
        else:
            tl.store(upper, result, mask=mask)
            tl.store(mirror, result, mask=mask)


def _default_splits(geo: _Geometry, block_rows: int, block_d: int, x: torch.Tensor) -> int:
    """Enough programs to fill the GPU (about 4 per SM) when the tiles alone are too few; 1 in the interpreter."""
    if not x.is_cuda:
        return 1
    tiles = math.comb(-(-geo.dim // block_d) + 1, 2) * geo.groups
    programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    most = max(1, geo.rows // (8 * block_rows))  # each split keeps at least 8 row blocks
    return max(1, min(most, programs // max(tiles, 1)))


def conv_factor_update_triton(
    out: torch.Tensor,
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    homogeneous: bool = False,
    alpha: float = 1.0,
    beta: float = 0.0,
    block_rows: int = 64,
    block_d: int = 64,
    splits: int | None = None,
) -> torch.Tensor:
    """``conv_factor_update_`` by the implicit-patch Triton kernel (see the module docstring)."""
    if tl is None:
        raise RuntimeError("conv_factor_update_triton needs the triton package")
    if not (x.is_cuda or interpreting()):
        raise RuntimeError("the Triton kernel needs a CUDA tensor, or TRITON_INTERPRET=1 for a CPU one")
    if block_rows < 16 or block_d < 16:
        raise ValueError("tl.dot needs blocks of at least 16")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    geo = _Geometry(x, kernel_size, stride, padding, dilation, groups, homogeneous)
    geo.check_out(out)
    if x.device != out.device:
        raise ValueError(f"x on {x.device} and out on {out.device}")
    x4 = x.unsqueeze(2) if geo.rank == 1 else x
    splits = _default_splits(geo, block_rows, block_d, x) if splits is None else int(splits)
    splits = max(1, min(splits, -(-geo.rows // block_rows)))
    per_split = -(-geo.rows // splits)
    per_split = -(-per_split // block_rows) * block_rows  # whole row blocks per split
    splits = -(-geo.rows // per_split)
    target = out if splits == 1 else out.new_empty(splits, *out.shape)
    so = (0, *out.stride()) if splits == 1 else target.stride()
    tiles = -(-geo.dim // block_d)
    read_out = splits == 1 and beta != 0
    _conv_gram_kernel[(tiles * tiles, geo.groups, splits)](
        x4, target,
        geo.rows, per_split, geo.features, geo.dim, geo.channels, tiles,
        geo.spatial[0], geo.spatial[1], geo.out[0], geo.out[1],
        geo.stride[0], geo.stride[1], geo.begin[0], geo.begin[1], geo.dilation[0], geo.dilation[1],
        *x4.stride(),
        *so,
        float(alpha), float(beta),
        KH=geo.kernel[0], KW=geo.kernel[1],
        HOMOGENEOUS=bool(homogeneous), READ_OUT=read_out, UPCAST=not x.is_cuda,
        BLOCK_ROWS=block_rows, BLOCK_D=block_d,
    )
    if splits > 1:
        _epilogue_(out, target.sum(0), beta)
    return out


# -- dispatch ------------------------------------------------------------------------------------------
def conv_factor_update_(
    out: torch.Tensor,
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    homogeneous: bool = False,
    alpha: float = 1.0,
    beta: float = 0.0,
    backend: str = "auto",
    **tuning: Any,
) -> torch.Tensor:
    """out [groups, D, D] float32 <- beta out + alpha sum over (example, output location) of p p^T, in place.

    p is group g's patch of the conv1d input x [N, C, L] or conv2d input x [N, C, H, W] (float32, bfloat16
    or float16) in F.unfold order, D = C/groups * prod(kernel_size) (+ 1 with the homogeneous coordinate
    appended when ``homogeneous``). Geometry as torch's convNd (ints or per-axis tuples), except that
    ``padding`` may also be ConvGeometry's ONNX order (begin pads, then end pads; ``geometry_arguments``
    turns a ConvGeometry into these keywords). Only the upper triangle of ``out`` is read, the result is
    exactly symmetric, and beta = 0 never reads ``out``. The runtime's A factor of a batch of m examples
    is alpha = 1/m (an EMA step: alpha = (1 - decay) / m, beta = decay). ``tuning`` (block_rows, block_d,
    splits) reaches the Triton kernel; ``backend`` as in triton_kernels/dispatch.py.
    """
    fn = conv_factor_update_triton if use_triton(backend, x, "conv_statistics") else conv_factor_update_reference
    return fn(out, x, kernel_size, stride, padding, dilation, groups, homogeneous=homogeneous, alpha=alpha,
              beta=beta, **tuning)


__all__ = [
    "conv_factor_update_",
    "conv_factor_update_reference",
    "conv_factor_update_triton",
    "geometry_arguments",
]
