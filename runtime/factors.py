"""Per-layer Kronecker factors A and G of one mini-batch, from captured sites (DESIGN.md conventions).

Every site is reduced to rows: activation rows p (a_bar = [a; 1] when the layer has a bias) and gradient
rows q, one row per (example, position), split per group: P [groups, R, a_dim], Q [groups, R, g_dim].

* Linear, input [n, in]: one position per example. A = mean_i a_bar a_bar^T, G = mean_i g g^T.
* Linear on sequences, input [n, T, in] (or flattened to [n * T, in], batch-major, as GPT-2's
  ``x.view(-1, in)``): positions are treated like KFC's locations (KFAC-expand):
  A = mean_i sum_t a_bar_t a_bar_t^T, G = mean_i (1/T) sum_t g_t g_t^T.
* Conv (KFC): the same with t the output locations and a_t the patches (runtime/patches.py).
* Several sites of one weight: their positions are pooled as more positions of the same example, so
  A is the sum of the sites' A and G the position-weighted mean of the sites' G (KFAC-expand).

Hence, with m the number of examples used and R the total number of rows:
A = (1/m) sum_rows p p^T and G = (1/R) sum_rows q q^T.

Scaling: g must be the per-example gradient dl_i/ds. A captured gradient of a loss that is a MEAN over
m examples is (1/m) dl_i/ds, so q = ``grad_scale`` * g_captured with grad_scale = m by default (pass 1
for a summed loss). Rows of the batch are examples along dim 0 (after viewing the leading dimension as
[batch_size, -1]); ``index`` restricts the statistics to some examples (the random fraction tau_1).

Fewer rows for A (``RowSubset``): a layer with several positions per example (conv patches, tokens) and more
activation rows than a limit forms A from a uniform random subset of them, each site's kept rows weighted by
its rows / kept: A_hat = (1/m) sum_sites (R_s/k_s) sum_kept p p^T, unbiased for A (its homogeneous corner exact).
G keeps every row (its dimension, the output channels, is usually the small one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from kronograph.passes.plan import Layer
from kronograph.runtime.capture import CaptureError, SiteRecord, batch_axis
from kronograph.runtime.patches import conv_patches, conv_patches_at, gradient_rows, output_spatial
from kronograph.triton_kernels.dispatch import use_triton


@dataclass
class SiteRows:
    """Rows of one site: P [groups, R, a_dim] (with the homogeneous 1 if biased), Q [groups, R, g_dim]; with a
    ``RowSubset``, P holds the kept rows only, each standing for ``weight`` rows (A sums weight p p^T)."""

    p: torch.Tensor
    q: torch.Tensor | None
    weight: float = 1.0


@dataclass
class RowSubset:
    """Form A from at most ``limit`` activation rows of a layer that has more rows than examples, drawn by
    ``generator`` (on its device) without replacement, in proportion to each site's rows."""

    limit: int
    generator: torch.Generator

    def choose(self, counts: Sequence[int], examples: int) -> list[torch.Tensor | None]:
        """For sites of ``counts`` rows, the rows each keeps (None: all): k_s = ceil(R_s limit / R) of its R_s,
        or every row where R is at most the limit or at most the number of examples (a row an example)."""
        total = sum(counts)
        if total <= self.limit or total <= examples:
            return [None] * len(counts)
        kept = []
        for count in counts:
            keep = max(1, -(-count * self.limit // total))
            kept.append(None if keep >= count else
                        torch.randperm(count, generator=self.generator, device=self.generator.device)[:keep])
        return kept


def _accumulate_sites(out: torch.Tensor | None, sites: Sequence[SiteRows], alpha: float, beta: float, *,
                      mirror: bool = True, homogeneous: bool = False, blocks: tuple[int, ...] | None = None
                      ) -> torch.Tensor:
    """A's ``accumulate_grams`` of the sites' P: in one call where they weigh alike, otherwise site by site with
    alpha times its weight."""
    if all(site.weight == sites[0].weight for site in sites):
        return accumulate_grams(out, [site.p for site in sites], alpha * sites[0].weight, beta, mirror=mirror,
                                homogeneous=homogeneous, blocks=blocks)
    for number, site in enumerate(sites):
        out = accumulate_grams(out, [site.p], alpha * site.weight, beta if number == 0 else 1.0,
                               homogeneous=homogeneous, mirror=mirror and number == len(sites) - 1, blocks=blocks)
    return out


def _merged(sites: list[SiteRows]) -> list[SiteRows]:
    """Sites of equal weight as one (their rows concatenated): a recurrent cell's T calls of a few rows each are
    one Gram product and one bound check, not T of each."""
    if len(sites) < 2 or any(site.weight != sites[0].weight for site in sites):
        return sites
    q = [site.q for site in sites if site.q is not None]
    return [SiteRows(torch.cat([site.p for site in sites], dim=1), torch.cat(q, dim=1) if q else None,
                     sites[0].weight)]


def _select(x: torch.Tensor, batch_size: int, index: torch.Tensor | None) -> torch.Tensor:
    """Keep the examples in ``index`` of a tensor whose dim 0 is batch_size examples (or a multiple of it:
    a flattened batch-major [batch_size * T, ...]), or, when dim 0 does not split that way, whose dim 1 is
    (sequence-first [T, batch_size, ...], as attention's projections see their input); checks the split
    even without an index. A sequence-first tensor whose T is a multiple of the batch size is read as
    batch-major: only which rows a subset ``index`` keeps differs, not the factors of the whole batch."""
    if x.dim() < 2 and batch_size == 1:
        return x
    if batch_axis(x, batch_size) == 1:
        return x if index is None else x[:, index]
    if x.dim() == 0 or x.shape[0] % batch_size:
        raise CaptureError(f"a captured tensor of shape {tuple(x.shape)} is not split into {batch_size} examples")
    if index is None:
        return x
    grouped = x.reshape(batch_size, x.shape[0] // batch_size, *x.shape[1:])
    return grouped[index].reshape(-1, *x.shape[1:])


def _flatten_linear(x: torch.Tensor) -> torch.Tensor:
    """A linear input [..., d] as [rows, d] (a 1-D input is one row)."""
    return x.reshape(-1, x.shape[-1])


def site_rows(
    layer: Layer,
    record: SiteRecord,
    *,
    batch_size: int,
    index: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    with_gradient: bool = True,
    ones_column: bool = True,
    rows: torch.Tensor | None = None,
) -> SiteRows:
    """P and Q of one site, in ``dtype`` (independent of the model's dtype); ``ones_column=False`` leaves out
    the homogeneous 1 of a layer with a bias (for the statistics kernel, which appends it virtually); ``rows``:
    the activation rows to keep (a conv's others are never formed; their weight is the caller's, ``layer_rows``),
    Q whole."""
    record.check_unchanged()
    a = _select(record.a, batch_size, index)
    g = None
    if with_gradient and record.g is not None:
        g = _select(record.g, batch_size, index).to(dtype)
    if layer.diagonal_a:  # a table: P is its indices [1, R] (capture.layer_input), one a row
        p = a.reshape(-1) if rows is None else a.reshape(-1).index_select(0, rows.to(a.device))
        return SiteRows(p[None], None if g is None else _by_group(layer, _flatten_linear(g)))
    a = a.to(dtype)
    groups = layer.groups
    if record.geometry is None:
        p, q = _flatten_linear(a), None if g is None else _flatten_linear(g)
        if rows is not None:
            p = p.index_select(0, rows.to(p.device))
    else:
        p = conv_patches(a, record.geometry) if rows is None else conv_patches_at(a, record.geometry, rows)
        q = None if g is None else gradient_rows(g)
    if p.shape[1] != groups * layer.in_features:
        raise CaptureError(
            f"layer {layer.name!r}: a site has {p.shape[1]} input features, "
            f"the plan says {groups} x {layer.in_features}"
        )
    p = p.reshape(p.shape[0], groups, layer.in_features).transpose(0, 1)
    if layer.bias is not None and ones_column:
        p = torch.cat([p, p.new_ones(groups, p.shape[1], 1)], dim=2)
    return SiteRows(p, None if q is None else _by_group(layer, q))


def _row_count(record: SiteRecord) -> int:
    """The number of activation rows of a site, without forming them (a table's indices: one a row)."""
    a = record.a
    if not a.is_floating_point():
        return a.numel()
    if record.geometry is None:
        return 1 if a.dim() < 2 else a.numel() // a.shape[-1]
    return a.shape[0] * math.prod(output_spatial(record.geometry, a.shape[2:]))


def rows_per_example(records: Sequence[SiteRecord], batch_size: int) -> float:
    """A layer's activation rows an example over its sites (1 for a plain linear layer, T for a sequence's)."""
    return sum(_row_count(record) for record in records) / batch_size


def _by_group(layer: Layer, q: torch.Tensor) -> torch.Tensor:
    """Output-gradient rows [R, groups * out] as [groups, R, out]."""
    return q.reshape(q.shape[0], layer.groups, layer.out_features).transpose(0, 1)


def _examples(batch_size: int, index: torch.Tensor | None) -> int:
    if index is None:
        return batch_size
    return int(index.numel()) if index.dtype != torch.bool else int(index.sum())


def layer_rows(
    layer: Layer, records: Sequence[SiteRecord], batch_size: int, index: torch.Tensor | None, dtype: torch.dtype,
    with_gradient: bool = True, ones_column: bool = True, subset: RowSubset | None = None,
) -> tuple[list[SiteRows], int, int]:
    """The rows of every site of a layer, the number of examples m and the total number of rows R
    (the gradient rows too unless ``with_gradient`` is False: then no site needs a gradient; ``subset``: the
    activation rows drawn where the layer has many, see ``RowSubset``)."""
    if not records:
        raise CaptureError(f"layer {layer.name!r} has no captured site")
    if with_gradient and all(r.g is None for r in records):
        raise CaptureError(f"layer {layer.name!r}: no site received a gradient; run backward or gradients_from first")
    m = _examples(batch_size, index)
    if m < 1:
        raise ValueError(f"layer {layer.name!r}: statistics need at least one example")
    counts = [_row_count(record) * m // batch_size for record in records]  # rows of the m examples
    kept = [None] * len(records) if subset is None else subset.choose(counts, m)
    sites = [site_rows(layer, record, batch_size=batch_size, index=index, dtype=dtype, with_gradient=with_gradient,
                       ones_column=ones_column, rows=rows) for record, rows in zip(records, kept)]
    for site, count, rows in zip(sites, counts, kept):
        if rows is not None:
            site.weight = count / rows.numel()  # each kept row stands for R_s / k_s rows
    return sites, m, sum(counts)


def _grad_scale(m: int, grad_scale: float | None) -> float:
    return float(m if grad_scale is None else grad_scale)


def batch_factors(
    layer: Layer,
    records: Sequence[SiteRecord],
    *,
    batch_size: int,
    grad_scale: float | None = None,
    index: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    subset: RowSubset | None = None,
    blocks: tuple[tuple[int, ...] | None, tuple[int, ...] | None] = (None, None),
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mini-batch factors (A [groups, a_dim, a_dim], G [groups, g_dim, g_dim]) of one layer (``blocks``: only
    A's and G's diagonal blocks formed, 0 elsewhere, as ``fold_factors_``'s).

    ``out``: finite tensors of the factors' shapes to write them into instead of new ones (a wide factor's fresh
    d x d costs page faults on every statistics step), 0 outside ``blocks`` (as factors formed with the same
    ``blocks`` are); a diagonal factor is always new.

    Args:
        records: the layer's sites from a Capture (gradients present; a site with g None counts as 0).
        batch_size: the number of examples n of the forward (dim 0 of the input, or its divisor).
        grad_scale: multiplies the captured g to make it per example; default: the number of examples
            used (right for a mean loss over them).
        index: examples to use (indices or a boolean mask over the batch), default all.
        dtype: the factors' dtype (float32 or float64, independent of the model's).
        subset: A from a random subset of the rows where there are many (``RowSubset``); None: every row.
    """
    # A table counts every index (as ``fold_factors_``); a bias's ones column is appended by accumulate_grams.
    homogeneous = layer.bias is not None
    sites, m, rows = layer_rows(layer, records, batch_size, index, dtype, ones_column=not homogeneous,
                                subset=None if layer.diagonal_a else subset)
    scale = _grad_scale(m, grad_scale)
    a_out, g_out = (None, None) if out is None else out
    a = (diagonal_counts(layer, sites, dtype) / m if layer.diagonal_a else
         _accumulate_sites(a_out, sites, 1.0 / m, 0.0, homogeneous=homogeneous, blocks=blocks[0]))
    g = _fold_g(layer, None if layer.diagonal_g else g_out, [site.q for site in sites if site.q is not None],
                scale * scale / rows, 0.0, blocks=blocks[1])
    return a, g


def _fold_g(layer: Layer, g: torch.Tensor | None, q_parts: Sequence[torch.Tensor], scale: float, decay: float,
            mirror: bool = True, blocks: tuple[int, ...] | None = None) -> torch.Tensor:
    """The EMA step G <- decay G + (1 - decay) scale sum_rows q q^T over the parts [groups, R, g_dim]; a
    ``Layer.diagonal_g``'s G is its diagonal [groups, g_dim], sum_rows q * q, folded by ``ema_`` as a table's A."""
    if not layer.diagonal_g:
        return accumulate_grams(g, q_parts, (1 - decay) * scale, decay, mirror=mirror, blocks=blocks)
    return ema_(g, sum((q * q).sum(dim=1) for q in q_parts) * scale, decay)


def fold_factors_(
    layer: Layer,
    records: Sequence[SiteRecord],
    a: torch.Tensor | None,
    g: torch.Tensor | None,
    *,
    decay: float,
    batch_size: int,
    grad_scale: float | None = None,
    index: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    mirror: bool = True,
    subset: RowSubset | None = None,
    blocks: tuple[tuple[int, ...] | None, tuple[int, ...] | None] = (None, None),
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The EMA step A <- decay A + (1 - decay) A_batch (and G likewise) without materialising the batch's
    factors: the Grams accumulate by baddbmm into A's and G's own storage (new tensors when None; decay 0
    replaces). Same arguments as ``batch_factors``; ``mirror=False`` leaves the lower triangles stale (see
    ``accumulate_grams``); ``blocks``: A's and G's diagonal blocks where only those are formed (``accumulate_grams``;
    None: whole). A conv layer on the statistics kernel (CUDA) reads every position whatever ``subset``
    (the kernel forms A from the input map itself, no patch rows to draw from).

    Returns None, leaving A and G untouched, when the batch's rows hold NaN/Inf or are large enough for a
    factor entry to overflow (|entry| <= sum over rows of max|row|^2): a poisoned EMA would never recover.
    """
    if a is None or g is None:  # a layer's first estimate is its batch factor (a layer first seen late, too)
        a = g = None
        decay = 0.0
    if _conv_on_kernel(records, dtype):
        return _fold_conv_on_kernel(layer, records, a, g, decay, batch_size, grad_scale, index, dtype, device)
    # A bias's homogeneous 1 is appended by accumulate_grams: virtually on the statistics kernel (no copy of the
    # rows), by one concatenation on the torch way. A table's A is its indices' counts, every index counted
    # (counting them all costs less than drawing some), which cannot overflow.
    homogeneous, table = layer.bias is not None, layer.diagonal_a
    sites, m, rows = layer_rows(layer, records, batch_size, index, dtype, ones_column=not homogeneous,
                                subset=None if table else subset)
    scale = _grad_scale(m, grad_scale)
    sites = [replace(site, p=site.p.to(device), q=None if site.q is None else site.q.to(device))
             for site in _merged(sites)]
    q_parts = [site.q for site in sites if site.q is not None]
    a_alpha, g_alpha = 1.0 / m, scale * scale / rows
    limit = torch.finfo(dtype).max / 8
    a_bound = 0.0 if table else _gram_bound([site.p for site in sites], at_least=1.0 if homogeneous else 0.0,
                                            weights=[site.weight for site in sites])
    if not (a_bound * a_alpha < limit and _gram_bound(q_parts) * g_alpha < limit):
        return None
    a = (ema_(a, diagonal_counts(layer, sites, dtype) * a_alpha, decay) if table else
         _accumulate_sites(a, sites, (1 - decay) * a_alpha, decay, mirror=mirror, homogeneous=homogeneous,
                           blocks=blocks[0]))
    return a, _fold_g(layer, g, q_parts, g_alpha, decay, mirror=mirror, blocks=blocks[1])


def diagonal_counts(layer: Layer, sites: Sequence[SiteRows], dtype: torch.dtype) -> torch.Tensor:
    """[1, rows]: how often each row of a table is read by the sites' indices, each kept index counting its site's
    weight: the diagonal of sum_rows weight e_k e_k^T (the padding row's index, ``rows``, counts for none)."""
    width = layer.in_features
    return sum(site.weight * torch.bincount(site.p.reshape(-1), minlength=width + 1)[:width].to(dtype)
               for site in sites)[None]


def _conv_on_kernel(records: Sequence[SiteRecord], dtype: torch.dtype) -> bool:
    """Whether a conv layer's A comes from ``triton_kernels.conv_statistics`` (implicit patches): float32
    factors, conv1d/conv2d sites, and the dispatch picks Triton for their inputs (CUDA)."""
    return (dtype == torch.float32
            and all(r.geometry is not None and len(r.geometry.kernel) in (1, 2) and not r.geometry.input_dilation
                    and r.a.dim() == len(r.geometry.kernel) + 2 for r in records)
            and use_triton("auto", records[0].a, "conv_statistics"))


def _fold_conv_on_kernel(layer: Layer, records: Sequence[SiteRecord], a: torch.Tensor | None,
                         g: torch.Tensor | None, decay: float, batch_size: int, grad_scale: float | None,
                         index: torch.Tensor | None, dtype: torch.dtype, device
                         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``fold_factors_`` of a conv layer with A straight from each site's input feature map (no patch tensor in
    memory; the kernel adds the homogeneous 1 itself) and G from the output-gradient rows as elsewhere."""
    from kronograph.triton_kernels.conv_statistics import conv_factor_update_, geometry_arguments

    m = _examples(batch_size, index)
    inputs, q_parts = [], []
    for record in records:
        record.check_unchanged()
        inputs.append(_select(record.a, batch_size, index).to(device=device, dtype=dtype))
        if record.g is not None:
            q_parts.append(_by_group(layer, gradient_rows(_select(record.g, batch_size, index).to(dtype))).to(device))
    if not q_parts:
        raise CaptureError(f"layer {layer.name!r}: no site received a gradient; run backward or gradients_from first")
    rows = sum(q.shape[1] for q in q_parts)
    scale = _grad_scale(m, grad_scale)
    a_alpha, g_alpha = 1.0 / m, scale * scale / rows
    limit = torch.finfo(dtype).max / 8
    # a patch entry is an input entry, a padding 0 or the homogeneous 1: |A entry| <= rows max(|x|, 1)^2 / m
    largest = max(1.0, *(float(x.abs().amax()) if x.numel() else 0.0 for x in inputs))
    if not (math.isfinite(largest) and rows * largest * largest * a_alpha < limit
            and _gram_bound(q_parts) * g_alpha < limit):
        return None
    if a is None:
        a = torch.empty(layer.groups, layer.a_dim, layer.a_dim, dtype=dtype, device=inputs[0].device)
    for number, (record, x) in enumerate(zip(records, inputs)):
        conv_factor_update_(a, x, **geometry_arguments(record.geometry, x.shape[2:]),
                            homogeneous=layer.bias is not None, alpha=(1 - decay) * a_alpha,
                            beta=decay if number == 0 else 1.0, backend="triton")
    return a, accumulate_grams(g, q_parts, (1 - decay) * g_alpha, decay)


def _gram_bound(parts: Sequence[torch.Tensor], at_least: float = 0.0, weights: Sequence[float] | None = None) -> float:
    """An upper bound of |entry| of sum_parts weight rows^T rows: sum of weight R max(max|x|, ``at_least``)^2 (inf
    when a row is not finite; ``at_least`` 1 counts a ones column appended virtually). The parts' extremes are
    read by the host at once (one synchronisation on a GPU)."""
    if not parts:
        return 0.0
    extremes = torch.stack([torch.stack(torch.aminmax(rows)).to(parts[0].device) for rows in parts]).tolist()
    total = 0.0
    for rows, weight, (low, high) in zip(parts, weights or [1.0] * len(parts), extremes):
        largest = max(abs(low), abs(high), at_least)
        if not math.isfinite(largest):
            return math.inf
        total += weight * rows.shape[1] * largest * largest
    return total


def accumulate_grams(
    out: torch.Tensor | None, parts: Sequence[torch.Tensor], alpha: float, beta: float, *, mirror: bool = True,
    panels: int = 4, min_size: int = 256, homogeneous: bool = False, blocks: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """out <- beta out + alpha sum_parts rows^T rows per group ([groups, r, d] rows -> [groups, d, d]), in
    place (out None: a new tensor, beta ignored), exactly symmetric. On CUDA (float32 factors) this is the
    Triton kernel ``triton_kernels.statistics.factor_update_``; elsewhere the torch way below.

    Only the upper triangle is computed: for d >= ``min_size``, ``panels`` block-rows right of the diagonal,
    each one baddbmm into out's storage ((k+1)/2k of the work; k = 4 is fastest here, about 0.67 of a full
    Gram for d ~ 1000). Writing in place also spares a fresh d x d tensor (page faults) and separate EMA
    passes. ``mirror=False`` skips copying the upper triangle to the lower one (``mirror_upper_``), which
    on CPU costs as much as the products for 64 rows: an EMA read once per inversion mirrors only then.
    ``homogeneous``: each part's rows are X, and the Gram is of [X, 1] (the kernel appends the ones column
    virtually; the torch way concatenates it).
    ``blocks``: only the diagonal blocks of these widths (over the first sum(blocks) coordinates) are formed, and
    with ``homogeneous`` the border of the last coordinate (the ones column's products: column sums and the count),
    the entries a block-diagonal inversion reads (``inverse.block_diagonal_inverse`` and a centred A's border); the
    rest of ``out`` is left as it is (0 in a new tensor). A 3137-wide A in four blocks is a quarter of the work.
    """
    if blocks is not None and not _on_kernel(out, parts):  # (the kernel forms the whole triangle)
        return _accumulate_blocks(out, parts, alpha, beta, blocks, mirror=mirror, panels=panels, min_size=min_size,
                                  homogeneous=homogeneous)
    first = parts[0]
    d = first.shape[-1] + int(homogeneous)
    if out is None:
        out, beta = first.new_empty(first.shape[0], d, d), 0.0
    if _on_kernel(out, parts):
        from kronograph.triton_kernels.statistics import ROW_DTYPES, factor_update_  # imports triton: only here

        if all(rows.dtype in ROW_DTYPES for rows in parts):
            for number, rows in enumerate(parts):  # one triangle, EMA and mirror fused; exactly symmetric
                factor_update_(out, rows, alpha, beta if number == 0 else 1.0, homogeneous=homogeneous,
                               backend="triton")
            return out
    # The parts' rows as one [groups, R, d]: one product for many small sites (a recurrent cell's T calls of a
    # few rows each) instead of one a site.
    rows = parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)
    if homogeneous:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], rows.shape[1], 1)], dim=2)
    k = panels if d >= min_size else 1
    edges = [round(i * d / k) for i in range(k + 1)]
    columns = rows.transpose(1, 2)
    for begin, end in zip(edges, edges[1:]):
        out[:, begin:end, begin:].baddbmm_(columns[:, begin:end], rows[:, :, begin:], beta=beta, alpha=alpha)
    return mirror_upper_(out, panels if d >= min_size else 1) if mirror else out


def _on_kernel(out: torch.Tensor | None, parts: Sequence[torch.Tensor]) -> bool:
    """Whether ``accumulate_grams`` takes the statistics kernel (float32 factors where Triton runs: CUDA)."""
    dtype = parts[0].dtype if out is None else out.dtype
    return dtype == torch.float32 and use_triton("auto", parts[0], "statistics")


def _accumulate_blocks(out: torch.Tensor | None, parts: Sequence[torch.Tensor], alpha: float, beta: float,
                       blocks: tuple[int, ...], *, mirror: bool, panels: int, min_size: int, homogeneous: bool
                       ) -> torch.Tensor:
    """``accumulate_grams`` of the diagonal ``blocks`` (and the homogeneous border) alone, the torch way."""
    rows = parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)
    d = rows.shape[-1] + int(homogeneous)
    inner = sum(blocks)
    if not (inner == d or inner == d - 1 and homogeneous):
        raise ValueError(f"blocks {blocks} do not cover a {d}-wide factor (homogeneous={homogeneous})")
    if out is None:
        out, beta = rows.new_zeros(rows.shape[0], d, d), 0.0
    if inner == d and homogeneous:  # the ones column lies inside the last block
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], rows.shape[1], 1)], dim=2)
    start = 0
    for width in blocks:  # each block mirrored alone (the rest is not formed: a whole mirror copies it for nothing)
        accumulate_grams(out[:, start:start + width, start:start + width], [rows[:, :, start:start + width]], alpha,
                         beta, mirror=mirror, panels=panels, min_size=min_size)
        start += width
    if inner == d - 1:  # the border: <x, 1> summed over the rows, its lower copy, and the count
        out[:, :-1, -1].mul_(beta).add_(rows.sum(dim=1), alpha=alpha)
        out[:, -1, -1].mul_(beta).add_(alpha * rows.shape[1])
        if mirror:
            out[:, -1, :-1] = out[:, :-1, -1]
    return out


def formed_by_blocks(d: int, blocks: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """The [d, d] mask of the entries ``accumulate_grams(..., blocks=blocks)`` forms in a d-wide factor: the diagonal
    blocks and, where they stop one short of d, the border of the ones column."""
    formed = torch.zeros(d, d, dtype=torch.bool, device=device)
    start = 0
    for width in blocks:
        formed[start:start + width, start:start + width] = True
        start += width
    formed[start:, :] = True
    formed[:, start:] = True
    return formed


def mirror_upper_(out: torch.Tensor, panels: int = 4) -> torch.Tensor:
    """Copy the upper triangle of [groups, d, d] onto the lower one, in place (by blocks of columns)."""
    d = out.shape[-1]
    edges = [round(i * d / panels) for i in range(panels + 1)]
    for begin, end in zip(edges, edges[1:]):
        out[:, end:, begin:end] = out[:, begin:end, end:].transpose(1, 2)
        diagonal = out[:, begin:end, begin:end]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).transpose(1, 2))
    return out


def capture_gradient(
    layer: Layer, records: Sequence[SiteRecord], *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """grad W_bar [groups, g_dim, a_dim] recomputed from the captured (a, g): sum over rows of g a_bar^T.

    Equals the gathered .grad of the weight (and bias column) when g came from the same backward; used
    to check the captures and as the cheap gradient of per-example or sub-batch losses.
    """
    total = None
    for record in records:
        if record.g is None:
            continue
        batch = record.a.shape[0] if record.a.dim() > 1 else 1
        site = site_rows(layer, record, batch_size=batch, dtype=dtype)
        part = site.q.transpose(1, 2) @ site.p
        total = part if total is None else total + part
    if total is None:
        raise CaptureError(f"layer {layer.name!r}: no site received a gradient")
    return total


def low_rank_pays(layer: Layer, rows: int) -> bool:
    """Whether G^-1 (Q^T P) A^-1 is much cheaper as (G^-1 Q^T)(P A^-1) (sec 8) for a gradient made of
    ``rows`` rows: R (g^2 + a^2 + g a) against g a (g + a) multiply-adds per group. "Much": at most half,
    since the rows must be captured and copied on the main pass too."""
    if layer.diagonal_a or layer.diagonal_g:  # a diagonal factor's inverse: preconditioned as cheaply whole
        return False
    g, a = layer.g_dim, layer.a_dim
    return 2 * rows * (g * g + a * a + g * a) < g * a * (g + a)


def low_rank_rows(
    blocks: Mapping[str, Any], records: Mapping[str, Sequence[SiteRecord]], batch_size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(P [groups, R, a_dim], Q [groups, R, g_dim]) of the layers whose gradient Q^T P is cheaper to
    precondition by rows (``low_rank_pays``); the rows of all sites are stacked. Q is the captured
    gradient of the loss itself, so Q^T P is exactly the weight gradient (tests check this)."""
    return low_rank_rows_of_parts(blocks, [(records, batch_size)], [(1.0,)])[0]


def low_rank_rows_of_parts(
    blocks: Mapping[str, Any], parts: Sequence[tuple[Mapping[str, Sequence[SiteRecord]], int]],
    weightings: Sequence[Sequence[float]],
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``low_rank_rows`` of a batch passed in parts (records, batch size), one dict per weighting: a weighting
    gives each part's gradient a weight (its Q rows are scaled by it), so Q^T P is that weighted sum of the
    parts' gradients. ``signal_scaling``'s halves use (w, 1 - w), the whole batch's gradient, and (1/2, -1/2),
    half their difference; the weightings share P (the same rows of inputs)."""
    found: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in weightings]
    for name, block in blocks.items():
        sites = [(r, size, index) for index, (records, size) in enumerate(parts) for r in records.get(name) or ()]
        if not sites or any(r.g is None for r, _, _ in sites) or any(not records.get(name) for records, _ in parts):
            continue
        layer = block.layer
        if not block.by_rows:
            continue
        rows = [(site_rows(layer, r, batch_size=size, dtype=block.dtype), index) for r, size, index in sites]
        if low_rank_pays(layer, sum(part.p.shape[1] for part, _ in rows)):
            p = torch.cat([part.p for part, _ in rows], dim=1)
            for weights, out in zip(weightings, found):
                out[name] = (p, torch.cat([part.q if weights[index] == 1.0 else weights[index] * part.q
                                           for part, index in rows], dim=1))
    return found


def paper_decay(step: int, maximum: float = 0.95) -> float:
    """The paper's EMA decay min(1 - 1/k, 0.95) at iteration k >= 1 (k = 1 replaces the estimate)."""
    if step < 1:
        raise ValueError(f"the EMA step counts from 1, got {step}")
    return min(1.0 - 1.0 / step, maximum)


def ema_(old: torch.Tensor | None, batch: torch.Tensor, decay: float) -> torch.Tensor:
    """new = decay * old + (1 - decay) * batch, in place in ``old`` (a copy of batch when old is None;
    decay 0 copies, so that even a non-finite old estimate is replaced)."""
    if old is None:
        return batch.clone()
    if old.shape != batch.shape:
        raise ValueError(f"EMA of shape {tuple(old.shape)} updated with shape {tuple(batch.shape)}")
    if decay == 0:
        return old.copy_(batch)
    return old.mul_(decay).add_(batch.to(old.dtype), alpha=1.0 - decay)
