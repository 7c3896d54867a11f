"""One statistics step's mini-batch factors, averaged across data-parallel ranks in one all_reduce.

Under DistributedDataParallel each rank sees its own slice of the batch and DDP averages the gradients;
K-FAC must precondition that average with the same factors on every rank, or the replicas drift apart.
A and G are means over examples, so the whole batch's factors are the ranks' factors weighted by their
numbers of examples m. Each rank packs, for every layer of the plan in plan order, the upper triangles of
m * A and m * G (A and G are symmetric: half the bytes, as kfac-pytorch's ``symmetry_aware``) and then every
layer's m into one flat buffer (zeros and m = 0 for a layer it has no statistics for); one all_reduce sums the
buffers, and each layer's sums divided by its total m, mirrored into full matrices (exactly symmetric), are the
global factors, the same on every rank, so the EMAs and the inverses computed from them stay the same too.
Communicated per statistics step: sum over the plan's layers of groups * (a_dim (a_dim + 1) / 2 + g_dim (g_dim
+ 1) / 2) entries, plus one count per layer, in the factors' dtype (or the entries in a narrower
``communication_dtype``, bfloat16 say, and the counts apart).

* The layout depends on the plan only, never on what a rank captured: the collective cannot hang on a rank
  that missed a layer, and it runs once per statistics step, not once per layer.
* A non-finite factor on any rank makes that layer's sums non-finite on every rank, so every rank rejects the
  layer's statistics of this step (KroneckerBlock.update_factors): the same decision everywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.distributed as dist

from kronograph.errors import KronographError
from kronograph.passes.plan import Layer

#: the dtypes the factors may travel in across the ranks, by name (KFAC's and KFACPreconditioner's
#: ``communication_dtype``, a setting the command line takes)
COMMUNICATION_DTYPES = ("bfloat16", "float16", "float32", "float64")

#: one layer's mini-batch statistics: (A, G, number of examples they are a mean over)
Statistics = dict[str, tuple[torch.Tensor, torch.Tensor, int]]


def dtype_named(name: str | None) -> torch.dtype | None:
    """The torch dtype a ``communication_dtype`` setting names (None: the factors' own)."""
    return None if name is None else getattr(torch, name)


def active_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group to average over: ``group`` when given, else torch.distributed's default group when it is
    initialised with more than one rank; None: a single process, nothing to average."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def refuse_data_parallel(method: str) -> None:
    """A KronographError for a method that does not run data-parallel yet, made under torch.distributed with more
    than one rank: each rank would step on its own slice of the batch alone and the replicas would drift apart
    without a word. KFAC and KFACPreconditioner are the ones that run there."""
    if (group := active_group(None)) is not None:
        raise KronographError(
            f"{method} does not run data-parallel yet: under torch.distributed with {dist.get_world_size(group)} "
            f"ranks each rank would train its own replica on its own slice and the replicas would drift apart; "
            "use kronograph.optim.KFAC (or KFACPreconditioner in your loop) there, or run "
            f"{method} in one process")


def triangle_entries(d: int) -> int:
    """Entries of a d x d matrix's upper triangle, diagonal included."""
    return d * (d + 1) // 2


@functools.lru_cache(maxsize=None)
def _triangle_index(d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions in a d x d matrix of its upper triangle (row-major) and of their mirror images; cached per
    size and device, as the same few sizes recur every step."""
    rows, cols = torch.triu_indices(d, d, device=device)
    return rows * d + cols, cols * d + rows


def pack_triangle(m: torch.Tensor) -> torch.Tensor:
    """[groups, d(d+1)/2]: the upper triangles of symmetric matrices [groups, d, d] (a copy)."""
    d = m.shape[-1]
    upper, _ = _triangle_index(d, m.device)
    return m.reshape(-1, d * d).index_select(1, upper)


def unpack_triangle(packed: torch.Tensor, d: int) -> torch.Tensor:
    """[groups, d, d] from ``pack_triangle``'s [groups, d(d+1)/2] (or its flat view), the lower triangle
    mirrored from the upper: exactly symmetric, the same bits wherever the same triangle is unpacked."""
    packed = packed.reshape(-1, triangle_entries(d))
    upper, lower = _triangle_index(d, packed.device)
    out = packed.new_empty(packed.shape[0], d * d)
    out[:, upper] = packed
    out[:, lower] = packed
    return out.view(-1, d, d)


def factor_size(d: int, diagonal: bool = False) -> int:
    """Entries of one packed d-wide factor: its upper triangle, or d for a diagonal one (a table's A, a head's G)."""
    return d if diagonal else triangle_entries(d)


def pack_factor(m: torch.Tensor) -> torch.Tensor:
    """``pack_triangle`` of factors [groups, d, d]; diagonal ones, kept as [groups, d], as they are."""
    return m.reshape(m.shape[0], -1) if m.dim() == 2 else pack_triangle(m)


def unpack_factor(packed: torch.Tensor, d: int, diagonal: bool = False) -> torch.Tensor:
    """``pack_factor``'s inverse: [groups, d, d], or [groups, d] for a diagonal factor."""
    return packed.reshape(-1, d) if diagonal else unpack_triangle(packed, d)


def factor_entries(layer: Layer) -> int:
    """One layer's entries in ``average_statistics``'s buffer, its count aside: the packed m A and m G."""
    return layer.groups * (factor_size(layer.a_dim, layer.diagonal_a) + factor_size(layer.g_dim, layer.diagonal_g))


def average_statistics(
    stats: Statistics,
    layers: Mapping[str, Layer],
    group: dist.ProcessGroup | None,
    dtype: torch.dtype,
    device: torch.device | str,
    communication_dtype: torch.dtype | None = None,
) -> Statistics:
    """The example-weighted mean over the group's ranks of each layer's (A, G), by one all_reduce.

    Every rank must call this at the same statistics step with the same ``layers`` (in the same order).
    Buffer: the upper triangles of m * A and m * G of each layer in order, then the layers' m. Returns the layers
    that some rank had statistics for, with their global factors (exactly symmetric) and the total number of
    examples. ``communication_dtype`` (bfloat16, float16: half of float32's bytes) is the dtype the triangles
    travel and are summed in, back in ``dtype`` after (every rank gets the same bits; the factors' relative
    rounding is that dtype's, 4e-3 for bfloat16); the counts then go in a second, tiny all_reduce in float64, as
    a narrow dtype would not hold them exactly.
    """
    if not layers:
        return {}
    device = torch.device(device)
    parts: list[torch.Tensor] = []
    counts = [float(stats[name][2]) if name in stats else 0.0 for name in layers]
    for name, layer in layers.items():
        if name in stats:
            a, g, m = stats[name]
            parts += [pack_factor(a.to(device, dtype)).reshape(-1) * m,
                      pack_factor(g.to(device, dtype)).reshape(-1) * m]
        else:
            parts.append(torch.zeros(factor_entries(layer), dtype=dtype, device=device))
    narrow = communication_dtype is not None and communication_dtype != dtype
    if narrow:
        buffer = torch.cat(parts).to(communication_dtype)
        totals_buffer = torch.tensor(counts, dtype=torch.float64, device=device)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(totals_buffer, op=dist.ReduceOp.SUM, group=group)
        buffer, totals = buffer.to(dtype), totals_buffer.tolist()
    else:
        buffer = torch.cat(parts + [torch.tensor(counts, dtype=dtype, device=device)])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        totals = buffer[-len(layers):].tolist()
    result: Statistics = {}
    offset = 0
    for (name, layer), m in zip(layers.items(), totals):
        a_size = layer.groups * factor_size(layer.a_dim, layer.diagonal_a)
        g_size = layer.groups * factor_size(layer.g_dim, layer.diagonal_g)
        if m > 0:
            a = unpack_factor(buffer[offset:offset + a_size], layer.a_dim, layer.diagonal_a)
            g = unpack_factor(buffer[offset + a_size:offset + a_size + g_size], layer.g_dim, layer.diagonal_g)
            result[name] = (a / m, g / m, int(round(m)))
        offset += a_size + g_size
    return result
