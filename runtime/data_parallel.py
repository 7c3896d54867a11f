"""A KFAC step across data-parallel ranks: each rank steps on its slice of the global batch, all take one step.

``kronograph.optim.KFAC`` under torch.distributed: rank r holds rows offset_r .. offset_r + n_r of the global
batch (the slices in rank order). Everything random is drawn for the global batch from the generator every
rank shares (same seed, same draws), and everything the step decides comes from sums over the ranks, so every
rank takes the same step: the one a single process would take on the whole batch, to float32 rounding.

* ``batch_slice``: the ranks' n_r, by one tiny all_reduce per step (slices may be unequal), as a ``BatchSlice``;
* ``BatchSlice.members``: which rows of a subset of the global batch (tau_1, tau_2) are this rank's;
* ``BatchSlice.halves``: this rank's rows of the global batch's two halves (``signal_scaling``);
* ``BatchSlice.sum``: one all_reduce of any tensors, flattened into one buffer (the gradient, the losses,
  the quadratic model's Gram sums);
* ``sampled_statistics_of_slice``: the statistics pass on this rank's members of the tau_1 subset, its sampled
  targets made from noise drawn for the whole subset (``Loss.sampling_noise``); with the parameters outside every
  block, their gradient too (K-FAC pools the ranks' by one ``BatchSlice.sum`` for the Fisher's diagonal);
* ``fold_across_ranks``: the members' mini-batch factors averaged over the ranks (``distributed.average_statistics``)
  and folded into the EMAs;
* ``shared_seed``: rank 0's seed for the generator when none is given;
* ``inverse_owners``: which rank inverts which layer's damped factors (``assign_inverses``, a greedy cost model);
* ``invert_across_ranks``: each rank inverts its layers only, and one all_gather gives every rank every layer's.

The inverse work is split as KAISA splits it (Pauloski et al. 2021, kfac-pytorch; the design, not its code): a
layer's A and G are inverted together on one rank, its owner, the layers dealt out once at construction by
``assign_inverses`` (cost groups * (a_dim^3 + g_dim^3), largest first, each to the least-loaded rank: the same
assignment on every rank, computed from the plan alone). Each inversion round (each gamma candidate of a
refresh) every rank runs ``factored_inverses`` on its own layers (the damping, the centred path, the float64
retry, a failed group keeping its previous inverse: all as one process does it) and packs, for each layer it
owns with statistics in plan order, the upper triangles of a_inv and g_inv, pi and the failed flags (as 0/1)
into one flat buffer in the factors' dtype, zero-padded to the largest rank's share (every rank knows every
share: they follow from the plan, the layers with statistics and the assignment); one all_gather_into_tensor
gives every rank every rank's buffer, and each layer is unpacked from its owner's segment, the triangles
mirrored. Every rank, the owner too, then uses the unpacked inverses, so all hold the same bits even where an
inverse was not exactly symmetric (the Triton Newton-Schulz path), and the same failure decisions; the
failure's InverseWarning is raised on the owner only.
Communicated per inversion round: each rank's buffer holds the largest share, max over the ranks of the sum over
its layers of groups * (a_dim (a_dim + 1) / 2 + g_dim (g_dim + 1) / 2 + 2) entries (4 bytes each in float32, 8
in float64); a ring all_gather sends (W - 1) such buffers per rank. Against the former zero-padded all_reduce of
every layer's full matrices (2 (W - 1) / W of groups * (a_dim^2 + g_dim^2 + 2) entries per rank) that is about
a quarter of the bytes when the shares are even; the cost model balances n^3 work, not n^2 bytes, so uneven
shares add padding, and once W times the largest share passes twice the total an all_reduce of the triangles
sends less (benchmarks/inverse_balance.py: the MNIST autoencoder at 16 ranks, ResNet-50 at 16), so that round is
one all_reduce of every layer's piece in plan order, zeros from the non-owners (x + 0 = x: the owner's bits). One
collective per round whose kind and size depend on the plan (and the layers with statistics) only. Every rank then holds
every inverse and preconditions the whole gradient itself; KAISA's other mode (the owner preconditions its
layers' gradients and broadcasts them, so the other ranks need not hold those inverses: less memory, more
communication per step) is not built.
"""

from __future__ import annotations

import bisect
import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kronograph.errors import KronographError
from kronograph.passes.plan import Layer, LayerPlan
from kronograph.runtime.capture import SiteRecord
from kronograph.runtime.distributed import (
    average_statistics,
    factor_size,
    pack_factor,
    unpack_factor,
)
from kronograph.runtime.curvature import BlockDiagonalCurvature
from kronograph.runtime.factors import RowSubset, batch_factors
from kronograph.runtime.inverse import DampedInverses, diagonal_block_sizes
from kronograph.runtime.losses import Loss
from kronograph.runtime.statistics import statistics_pass, subset

Records = dict[str, list[SiteRecord]]

#: dtypes of model outputs that ``example_shape`` can tell the other ranks (an index into this tuple, from 1)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_DIMS = 8  # of an example's outputs


def shared_seed(group: dist.ProcessGroup, seed: int | None, device: torch.device) -> int:
    """The generator's seed on every rank: ``seed``, or the one the group's rank 0 draws from torch's global
    generator (as ``statistics.make_generator`` would), broadcast (a collective at construction)."""
    if seed is not None:
        return int(seed)
    drawn = torch.randint(0, 2**62, (1,), device="cpu").to(device)
    dist.broadcast(drawn, src=dist.get_global_rank(group, 0), group=group)
    return int(drawn.item())


@dataclass(frozen=True)
class Members:
    """This rank's part of a subset of the global batch: ``positions`` in the subset (ascending) and the
    matching ``rows`` of this rank's slice; ``count`` the subset's size over all ranks; ``everyone``: whether
    every rank has at least one member."""

    positions: torch.Tensor
    rows: torch.Tensor | None  # None: the whole slice (the subset is the whole batch)
    count: int
    everyone: bool

    @property
    def local(self) -> int:
        return int(self.positions.numel())


#: The fewest examples of a part of the batch that batch norm normalises on its own (a half of signal scaling, a
#: rank's piece of it): over two examples BatchNorm1d's outputs are +-1 whatever the inputs (each feature keeps only
#: the sign of their difference), a function other than the batch's; halves of 2 left a BatchNorm1d MLP at chance
#: and a small ResNet diverging, halves of 4 the ResNet at 1.5-3.1 after 200 steps where the whole batch of 8 gives
#: 1.0-1.2 (BENCHMARKS.md).
FEWEST_NORMALISED = 8


def fewest_to_halve(batch_norm: bool) -> int:
    """The smallest batch signal scaling splits into halves: 2 (halves of one example), with batch norm two halves
    of ``FEWEST_NORMALISED``."""
    return 2 * FEWEST_NORMALISED if batch_norm else 2


@dataclass(frozen=True)
class BatchSlice:
    """This rank's rows offset .. offset + size of the global batch of ``total`` examples, in ``group``."""

    group: dist.ProcessGroup
    counts: tuple[int, ...]
    rank: int
    device: torch.device

    @property
    def offset(self) -> int:
        return sum(self.counts[:self.rank])

    @property
    def size(self) -> int:
        return self.counts[self.rank]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def weight(self) -> float:
        """n_r / N: this rank's share of a mean over the global batch."""
        return self.size / self.total

    def members(self, index: torch.Tensor | None) -> Members:
        """This rank's members of the subset ``index`` of the global batch (None: all of it); one host read."""
        if index is None:
            positions = torch.arange(self.offset, self.offset + self.size, device=self.device)
            return Members(positions, None, self.total, all(n > 0 for n in self.counts))
        drawn = index.tolist()
        ends = list(itertools.accumulate(self.counts))
        owners = [bisect.bisect_right(ends, i) for i in drawn]
        mine = [j for j, owner in enumerate(owners) if owner == self.rank]
        positions = torch.tensor(mine, dtype=torch.long, device=self.device)
        rows = torch.tensor([drawn[j] - self.offset for j in mine], dtype=torch.long, device=self.device)
        return Members(positions, rows, len(drawn), len(set(owners)) == len(self.counts))

    def halves(self, batch_norm: bool = True) -> tuple[int, int] | None:
        """This rank's numbers of rows in the global batch's first half (its first N // 2 examples, as a single
        process splits it) and in its second half, or None where the halves cannot be passed: N < 2, or, for a
        model with ``batch_norm``, N < 16 or some rank would pass a piece of fewer than ``FEWEST_NORMALISED``
        examples. The same answer on every rank."""
        half, pieces, offset = self.total // 2, [], 0
        for n in self.counts:
            first = min(max(half - offset, 0), n)
            pieces += [first, n - first]
            offset += n
        if self.total < fewest_to_halve(batch_norm) or batch_norm and any(0 < piece < FEWEST_NORMALISED
                                                                           for piece in pieces):
            return None
        return pieces[2 * self.rank], pieces[2 * self.rank + 1]

    def sum(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors summed over the ranks, by one all_reduce of one flat buffer (in the widest of their
        dtypes, float32 at least); each comes back in its own dtype and shape."""
        dtype = torch.float32
        for t in tensors:
            dtype = torch.promote_types(dtype, t.dtype)
        buffer = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        parts = buffer.split([t.numel() for t in tensors])
        return [part.view(t.shape).to(t.dtype) for part, t in zip(parts, tensors)]

    def largest(self, value: torch.Tensor) -> torch.Tensor:
        """A 0-dim tensor's largest value over the ranks (one all_reduce)."""
        value = value.reshape(1).to(torch.float64).clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group)
        return value[0]


def batch_slice(group: dist.ProcessGroup, size: int, device: torch.device) -> BatchSlice:
    """Every rank's number of examples in this step, by one all_reduce (one host read)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    counts = torch.zeros(world, dtype=torch.int64, device=device)
    counts[rank] = size
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    counts = tuple(int(n) for n in counts.tolist())
    if 0 in counts:  # every rank raises the same error: none is left waiting in a collective
        raise KronographError(f"data-parallel K-FAC: the ranks' batches have {list(counts)} examples; every rank needs "
                              "at least one in every step (drop the last partial batch, or pad it)")
    return BatchSlice(group, counts, rank, device)


def example_shape(group: dist.ProcessGroup, outputs: torch.Tensor | None,
                  device: torch.device) -> tuple[torch.Size, torch.dtype]:
    """One example's output shape and the outputs' dtype, told by the ranks that have outputs to those that have
    none (one all_reduce of a few integers; only on steps where some rank has no member of the subset)."""
    known = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=device)
    if outputs is not None:
        shape = outputs.shape[1:]
        known[0], known[1] = _DTYPES.index(outputs.dtype) + 1, len(shape)
        known[2:2 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
    dist.all_reduce(known, op=dist.ReduceOp.MAX, group=group)
    code, dims, *sizes = known.tolist()
    return torch.Size(sizes[:dims]), _DTYPES[code - 1]


def sampled_statistics_of_slice(
    module: torch.nn.Module,
    plan: LayerPlan | Sequence[Layer],
    loss: Loss,
    inputs: Sequence[torch.Tensor],
    part: BatchSlice,
    fraction: float,
    generator: torch.Generator,
    minimum: int = 1,
    select: Callable[[Any], torch.Tensor] | None = None,
    parameters: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Records, int, dict[str, torch.Tensor]]:
    """``statistics.sampled_statistics`` of the global batch, this rank's share: the tau_1 subset of the global
    batch, the sampling noise of all its examples (every rank draws it all, so the generators stay together),
    a forward and backward on this rank's members with their rows of the noise. Returns the captured sites,
    the number of members and the statistics loss's gradient of the ``parameters`` ({}, 0 and {} for a rank with
    none: no pass)."""
    members = part.members(subset(part.total, fraction, generator, minimum))

    def sample(outputs: torch.Tensor | None) -> torch.Tensor | None:
        if members.everyone:
            shape, dtype = outputs.shape[1:], outputs.dtype
        else:
            shape, dtype = example_shape(part.group, outputs, generator.device)
        noise = loss.sampling_noise(torch.Size((members.count, *shape)), dtype, generator)
        return None if outputs is None else loss.targets_from_noise(outputs, noise[members.positions])

    if not members.local:
        sample(None)
        return {}, 0, {}
    sub = tuple(inputs) if members.rows is None else tuple(t[members.rows] for t in inputs)
    records, grads = statistics_pass(module, plan, loss, sub, sample, select, parameters)
    return records, members.local, grads


def fold_across_ranks(
    blocks: Mapping[str, Any],
    records: Records | None,
    batch_size: int,
    rows: torch.Tensor | None,
    grad_scale: float | None,
    decay: float,
    part: BatchSlice,
    dtype: torch.dtype,
    device: torch.device,
    communication_dtype: torch.dtype | None = None,
    subset: RowSubset | None = None,
) -> list[str]:
    """Fold the example-weighted mean over the ranks of each layer's mini-batch factors into its EMAs: this
    rank's are those of ``rows`` of its captured sites (None: all ``batch_size``; A from a ``subset`` of a
    layer's activation rows where it has many, factors.RowSubset), every rank joins the one
    all_reduce (a rank with no rows or no sites adds zeros and m = 0; ``communication_dtype``: see
    ``average_statistics``). Returns the layers folded (some rank had their statistics); a layer whose averaged
    factors are not finite keeps its EMAs on every rank."""
    m = batch_size if rows is None else int(rows.numel())
    stats = {}
    if records and m:
        for name, block in blocks.items():
            sites = records.get(name)
            if sites and any(record.g is not None for record in sites):
                a, g = batch_factors(block.layer, sites, batch_size=batch_size, grad_scale=grad_scale, index=rows,
                                     dtype=dtype, subset=subset, blocks=block.statistics_blocks)
                stats[name] = (a, g, m)
    layers = {name: block.layer for name, block in blocks.items()}
    averaged = average_statistics(stats, layers, part.group, dtype, device, communication_dtype)
    for name, (a, g, _) in averaged.items():
        blocks[name].update_factors(a, g, decay)
    return list(averaged)


def inverse_cost(groups: int, a_dim: int, g_dim: int, max_dim: int | None = None, diagonal_a: bool = False,
                 diagonal_g: bool = False) -> int:
    """The cost model of one layer's inverses: groups * (a_dim^3 + g_dim^3), its A and G inverted together (a
    factor wider than ``max_dim``: the sum of its diagonal blocks' cubes, inverse.diagonal_block_sizes; a diagonal
    factor, a table's A or a wide head's G: its width)."""
    def cost(width: int, diagonal: bool) -> int:
        return width if diagonal else sum(block ** 3 for block in diagonal_block_sizes(width, max_dim))
    return groups * (cost(a_dim, diagonal_a) + cost(g_dim, diagonal_g))


def assign_inverses(costs: Sequence[float], world: int) -> list[int]:
    """The rank that inverts each layer (``costs`` in plan order): the layers by cost, largest first (ties in plan
    order), each given to the least-loaded rank so far (ties: the lowest rank). Greedy list scheduling: the
    most-loaded rank exceeds the least-loaded one by at most the largest single cost, so its load is at most the
    mean plus that. Deterministic: every rank computes the same assignment."""
    if world < 1:
        raise ValueError(f"world must be at least 1, got {world}")
    loads = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world: int) -> list[float]:
    """Each rank's summed cost under an assignment."""
    loads = [0.0] * world
    for cost, rank in zip(costs, owners):
        loads[rank] += cost
    return loads


def inverse_owners(layers: Sequence[Layer], world: int, max_dim: int | None = None) -> dict[str, int]:
    """Layer name -> the rank that inverts its factors (``assign_inverses`` of the plan's layers, factors wider
    than ``max_dim`` inverted block-diagonally)."""
    costs = [inverse_cost(layer.groups, layer.a_dim, layer.g_dim, max_dim, layer.diagonal_a, layer.diagonal_g)
             for layer in layers]
    return {layer.name: rank for layer, rank in zip(layers, assign_inverses(costs, world))}


def inverse_entries(groups: int, a_dim: int, g_dim: int, diagonal_a: bool = False, diagonal_g: bool = False) -> int:
    """One layer's entries in ``invert_across_ranks``'s buffer: the packed a_inv and g_inv (each its upper
    triangle, or its diagonal: a table's A, a wide head's G), and pi and the failed flag per group."""
    return groups * (factor_size(a_dim, diagonal_a) + factor_size(g_dim, diagonal_g) + 2)


def invert_across_ranks(curvature: BlockDiagonalCurvature, gamma: float, owners: Mapping[str, int],
                        group: dist.ProcessGroup, g_shares: Mapping[str, float] | None = None
                        ) -> dict[str, DampedInverses | None]:
    """``curvature.invert(gamma)`` split across the ranks: this rank inverts the layers ``owners`` gives it and packs
    them (triangles, pi, failed flags), and ``exchange_from_owners`` gives every rank every layer's piece, which
    every rank (the owner too) unpacks, mirrored: the same bits on every rank. Every rank must call this in the same
    round (the layers with statistics are the same on every rank: their factors are folded from all-reduced
    statistics). None for a layer with no statistics, as ``invert`` (``g_shares``: as ``invert``'s). A tied table
    (runtime/tied.py) has no owner: every rank inverts it from the same factors, and nothing of it is exchanged."""
    rank = dist.get_rank(group)
    owned = {name for name, owner in owners.items() if owner == rank}
    local = curvature.invert(gamma, only=owned | set(curvature.ties), g_shares=g_shares)
    estimated = {name: block for name, block in curvature.blocks.items() if block.estimated and not block.tied}
    result: dict[str, DampedInverses | None] = {name: None for name in curvature.blocks}
    result.update({name: local[name] for name, block in curvature.blocks.items() if block.tied})
    if not estimated:
        return result
    first = next(iter(estimated.values()))
    dtype, device = first.dtype, first.a.device
    sizes = {name: inverse_entries(b.layer.groups, b.layer.a_dim, b.layer.g_dim, b.layer.diagonal_a,
                                   b.layer.diagonal_g) for name, b in estimated.items()}
    pieces = {}
    for name in estimated:
        if owners[name] == rank:
            mine = local[name]
            pieces[name] = torch.cat([pack_factor(mine.a_inv.to(dtype)).reshape(-1),
                                      pack_factor(mine.g_inv.to(dtype)).reshape(-1),
                                      mine.pi.reshape(-1).to(dtype), mine.failed.reshape(-1).to(dtype)])
    flat = exchange_from_owners(pieces, sizes, owners, group, dtype, device)
    for name, block in estimated.items():
        layer = block.layer
        n, a, g, diagonal_a, diagonal_g = layer.groups, layer.a_dim, layer.g_dim, layer.diagonal_a, layer.diagonal_g
        a_inv, g_inv, pi, failed = flat[name].split([n * factor_size(a, diagonal_a), n * factor_size(g, diagonal_g),
                                                     n, n])
        result[name] = DampedInverses(unpack_factor(a_inv, a, diagonal_a), unpack_factor(g_inv, g, diagonal_g), pi,
                                      failed > 0.5)
    return result


def exchange_from_owners(pieces: Mapping[str, torch.Tensor], sizes: Mapping[str, int], owners: Mapping[str, int],
                         group: dist.ProcessGroup, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Every layer's flat piece on every rank, each computed by its owner alone.

    ``pieces``: this rank's (the layers ``owners`` gives it, ``sizes[name]`` entries each, in ``dtype``); ``sizes``:
    every layer's, in plan order, the same on every rank. One all_gather of the ranks' segments (each owner's layers
    in plan order), padded to the largest rank's share, or, where the padding would make that send more, one
    all_reduce of every layer's piece with zeros from the non-owners: the same bits on every rank either way."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shares = [0] * world
    for name, size in sizes.items():
        shares[owners[name]] += size
    width = max(shares)
    if world * width <= 2 * sum(shares):  # a ring all_gather sends (W - 1) width, an all_reduce 2 (W - 1) / W total
        segments = [pieces[name] for name in sizes if owners[name] == rank]
        segments.append(torch.zeros(width - shares[rank], dtype=dtype, device=device))
        buffer = torch.empty(world * width, dtype=dtype, device=device)
        with warnings.catch_warnings():  # torch 2.13 deprecates the name for all_gather_single, absent from older torch
            warnings.filterwarnings("ignore", message=".*all_gather_into_tensor", category=FutureWarning)
            dist.all_gather_into_tensor(buffer, torch.cat(segments), group=group)
        offsets = [r * width for r in range(world)]
        starts = {}
        for name in sizes:  # each owner's layers in plan order from its segment's start
            starts[name] = offsets[owners[name]]
            offsets[owners[name]] += sizes[name]
    else:  # shares too uneven for the padding: every layer in plan order, zeros from the non-owners, summed
        starts = dict(zip(sizes, itertools.accumulate([0, *sizes.values()])))
        buffer = torch.cat([pieces[name] if owners[name] == rank else torch.zeros(size, dtype=dtype, device=device)
                            for name, size in sizes.items()])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return {name: buffer[starts[name]:starts[name] + size] for name, size in sizes.items()}
