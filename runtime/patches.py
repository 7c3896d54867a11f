"""Convolution patches (im2col) for the KFC statistics, in F.unfold column order.

A convolution is a linear layer applied at every output location t to the patch a_t of its input; the
columns of a patch are ordered channel-major, then kernel offsets row-major (the order of F.unfold and
of ``weight.reshape(out, -1)``), so W_bar = [weight.reshape(out, -1) b] multiplies [a_t; 1].

Padding follows the ONNX order of ConvGeometry: the begin pads of every spatial axis, then the end pads.
Symmetric pads go to F.unfold; asymmetric ones are applied with F.pad first (zeros, as the convolution
does). 1-D convolutions are viewed as 2-D ones with a height of 1; 3-D ones use Tensor.unfold per axis.
A transposed convolution's patches are those of the convolution it equals, on its input with zeros between
neighbours (``dilated_input``, ConvGeometry.input_dilation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kronograph.passes.plan import ConvGeometry, transposed_geometry


def per_axis(value: int | Sequence[int], rank: int) -> tuple[int, ...]:
    """A convolution's or pool's int-or-sequence argument as one value per spatial axis (a single value repeated)."""
    if isinstance(value, int):
        return (value,) * rank
    value = tuple(int(v) for v in value)
    return value * rank if len(value) == 1 else value


def call_geometry(
    kernel: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> ConvGeometry:
    """The ConvGeometry of a torch ``convNd`` call (its padding may be an int, a tuple, "same" or "valid")."""
    kernel = tuple(int(k) for k in kernel)
    rank = len(kernel)
    stride, dilation = per_axis(stride, rank), per_axis(dilation, rank)
    if isinstance(padding, str):
        if padding == "valid":
            begin = end = (0,) * rank
        elif padding == "same":  # torch: total = d (k - 1), the odd extra pad goes at the end
            totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
            begin = tuple(t // 2 for t in totals)
            end = tuple(t - t // 2 for t in totals)
        else:
            raise ValueError(f"unknown convolution padding {padding!r}")
    else:
        begin = end = per_axis(padding, rank)
    return ConvGeometry(kernel, stride, begin + end, dilation, int(groups))


def transposed_call_geometry(
    kernel: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    output_padding: int | Sequence[int] = 0,
    groups: int = 1,
    dilation: int | Sequence[int] = 1,
) -> ConvGeometry | None:
    """The ConvGeometry of a torch ``conv_transposeNd`` call: the convolution it equals (``transposed_geometry``;
    None where its padding exceeds dilation (kernel - 1))."""
    kernel = tuple(int(k) for k in kernel)
    rank = len(kernel)
    padding = per_axis(padding, rank)
    return transposed_geometry(kernel, per_axis(stride, rank), padding, padding, per_axis(output_padding, rank),
                               per_axis(dilation, rank), int(groups))


def resolve_pads(geometry: ConvGeometry, spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(begin pads, end pads) per spatial axis, resolving ONNX auto_pad from the input's spatial shape."""
    rank = len(geometry.kernel)
    auto = geometry.auto_pad
    if auto in ("", "NOTSET"):
        pads = per_axis(geometry.padding, rank) if len(geometry.padding) <= 1 else tuple(geometry.padding)
        if len(pads) == rank:  # symmetric pads given once per axis
            return pads, pads
        return pads[:rank], pads[rank:]
    if auto == "VALID":
        return (0,) * rank, (0,) * rank
    begin, end = [], []
    for size, k, s, d in zip(spatial, geometry.kernel, geometry.stride, geometry.dilation):
        out = -(-size // s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return tuple(begin), tuple(end)


def dilated_input(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """A transposed convolution's input [N, C, *spatial] with ``input_dilation - 1`` zeros between neighbours on
    each axis: what the convolution it equals reads (``x`` itself for an ordinary convolution)."""
    steps = geometry.input_dilation
    if not steps or all(s == 1 for s in steps):
        return x
    out = x.new_zeros(*x.shape[:2], *_dilated_spatial(geometry, x.shape[2:]))
    out[(slice(None), slice(None), *(slice(None, None, s) for s in steps))] = x
    return out


def _dilated_spatial(geometry: ConvGeometry, spatial: Sequence[int]) -> tuple[int, ...]:
    """The spatial shape of ``dilated_input``'s result: (size - 1) * stride + 1 an axis (``spatial`` itself for an
    ordinary convolution)."""
    if not geometry.input_dilation:
        return tuple(spatial)
    return tuple((size - 1) * s + 1 for size, s in zip(spatial, geometry.input_dilation))


def output_spatial(geometry: ConvGeometry, spatial: Sequence[int]) -> tuple[int, ...]:
    """Output spatial shape of the convolution (the number of locations T is its product)."""
    spatial = _dilated_spatial(geometry, spatial)
    begin, end = resolve_pads(geometry, spatial)
    return tuple(
        (size + b + e - d * (k - 1) - 1) // s + 1
        for size, b, e, k, s, d in zip(spatial, begin, end, geometry.kernel, geometry.stride, geometry.dilation)
    )


def conv_patches(x: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    """Patches of ``x`` [N, C, *spatial] as rows [N * T, C * prod(kernel)], example-major then location.

    Rows are ordered (example, location) with locations row-major over the output grid, the order in
    which a gradient [N, out, *out_spatial] flattens after moving the channel axis last.
    """
    rank = len(geometry.kernel)
    if x.dim() != rank + 2:
        raise ValueError(f"a conv{rank}d input needs {rank + 2} dimensions [N, C, ...], got shape {tuple(x.shape)}")
    x = dilated_input(x, geometry)
    begin, end = resolve_pads(geometry, x.shape[2:])
    if begin != end:
        flat = [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]
        x, begin = F.pad(x, flat), (0,) * rank
    n, c = x.shape[:2]
    kernel, stride, dilation = geometry.kernel, geometry.stride, geometry.dilation
    if rank in (1, 2):
        if rank == 1:
            x = x.unsqueeze(2)
            kernel, stride, dilation, begin = (1, *kernel), (1, *stride), (1, *dilation), (0, *begin)
        cols = F.unfold(x, kernel, dilation=dilation, padding=begin, stride=stride)  # [N, C*K, T]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if any(begin):
        x = F.pad(x, [p for b in reversed(begin) for p in (b, b)])
    for axis, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
        x = x.unfold(2 + axis, d * (k - 1) + 1, s)  # appends a window axis of the dilated extent
        if d > 1:
            x = x[..., ::d]
    # x: [N, C, o_1..o_r, k_1..k_r] -> [N, o_1..o_r, C, k_1..k_r]
    order = [0, *range(2, 2 + rank), 1, *range(2 + rank, 2 + 2 * rank)]
    return x.permute(order).reshape(-1, c * math.prod(kernel))


def conv_patches_at(x: torch.Tensor, geometry: ConvGeometry, rows: torch.Tensor) -> torch.Tensor:
    """The rows ``rows`` (indices into ``conv_patches``' N * T rows) of the patches of ``x``, gathered from the
    padded input without forming the others: a few rows of a wide layer cost a few rows, not an im2col."""
    rank = len(geometry.kernel)
    if x.dim() != rank + 2:
        raise ValueError(f"a conv{rank}d input needs {rank + 2} dimensions [N, C, ...], got shape {tuple(x.shape)}")
    out = output_spatial(geometry, x.shape[2:])
    x = dilated_input(x, geometry)
    begin, end = resolve_pads(geometry, x.shape[2:])
    if any(begin) or any(end):
        x = F.pad(x, [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)])
    rows = rows.to(x.device)
    example, location = rows // math.prod(out), rows % math.prod(out)
    index = [example.view(-1, *(1,) * rank)]
    for axis in reversed(range(rank)):  # the location's coordinate on each axis, then its kernel offsets
        at, location = location % out[axis], location // out[axis]
        offsets = torch.arange(geometry.kernel[axis], device=x.device) * geometry.dilation[axis]
        shape = [1] * rank
        shape[axis] = -1
        index.insert(1, at.view(-1, *(1,) * rank) * geometry.stride[axis] + offsets.view(1, *shape))
    picked = x.movedim(1, -1)[tuple(index)]  # [R, k_1..k_r, C]
    return picked.movedim(-1, 1).reshape(rows.shape[0], -1)


def gradient_rows(g: torch.Tensor) -> torch.Tensor:
    """A conv output gradient [N, out, *spatial] as rows [N * T, out], matching ``conv_patches``."""
    return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
