"""One statistics step's mini-batch factors, averaged across data-parallel ranks in one all_reduce.

Under DistributedDataParallel each rank sees its own slice of the batch and DDP averages the gradients;
K-FAC must precondition that average with the same factors on every rank, or the replicas drift apart.
A and G are means over examples, so the whole batch's factors are the ranks' factors weighted by their
numbers of examples m. Each rank packs, for every layer of the plan in plan order, m * A, m * G and m into
one flat buffer (zeros and m = 0 for a layer it has no statistics for); one all_reduce sums the buffers
and each layer's sums divided by its total m are the global factors, the same on every rank, so the EMAs
and the inverses computed from them stay the same too (inverses are computed on every rank).

* The layout depends on the plan only, never on what a rank captured: the collective cannot hang on a rank
  that missed a layer, and it runs once per statistics step, not once per layer.
* A non-finite factor on any rank makes that layer's sums non-finite on every rank, so every rank rejects the
  layer's statistics of this step (KroneckerBlock.update_factors): the same decision everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from kronograph.passes.plan import Layer

#: one layer's mini-batch statistics: (A, G, number of examples they are a mean over)
Statistics = dict[str, tuple[torch.Tensor, torch.Tensor, int]]


def active_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group to average over: ``group`` when given, else torch.distributed's default group when it is
    initialised with more than one rank; None: a single process, nothing to average."""
    if group is not None:
        return group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _shapes(layer: Layer) -> tuple[torch.Size, torch.Size]:
    return (torch.Size((layer.groups, layer.a_dim, layer.a_dim)),
            torch.Size((layer.groups, layer.g_dim, layer.g_dim)))


def average_statistics(
    stats: Statistics,
    layers: Mapping[str, Layer],
    group: dist.ProcessGroup | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Statistics:
    """The example-weighted mean over the group's ranks of each layer's (A, G), by one all_reduce.

    Every rank must call this at the same statistics step with the same ``layers`` (in the same order).
    Buffer: m * A and m * G of each layer in order, then the layers' m. Returns the layers that some rank
    had statistics for, with their global factors and the total number of examples.
    """
    if not layers:
        return {}
    parts: list[torch.Tensor] = []
    counts = [float(stats[name][2]) if name in stats else 0.0 for name in layers]
    for name, layer in layers.items():
        a_shape, g_shape = _shapes(layer)
        if name in stats:
            a, g, m = stats[name]
            parts += [a.to(device, dtype).reshape(-1) * m, g.to(device, dtype).reshape(-1) * m]
        else:
            parts.append(torch.zeros(a_shape.numel() + g_shape.numel(), dtype=dtype, device=device))
    buffer = torch.cat(parts + [torch.tensor(counts, dtype=dtype, device=device)])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    totals = buffer[-len(layers):].tolist()
    result: Statistics = {}
    offset = 0
    for (name, layer), m in zip(layers.items(), totals):
        a_shape, g_shape = _shapes(layer)
        a = buffer[offset:offset + a_shape.numel()].view(a_shape)
        g = buffer[offset + a_shape.numel():offset + a_shape.numel() + g_shape.numel()].view(g_shape)
        offset += a_shape.numel() + g_shape.numel()
        if m > 0:
            result[name] = (a / m, g / m, int(round(m)))
    return result
