"""The action A s of a layer's mini-batch input factor, and the mean input vector, without forming A.

K-BFGS's "minibatched Hessian-action BFGS" (Ren's thesis, chapter 3, Improvement #2 and eqs.
(3.14)-(3.15), Algorithm 9 line 16) updates H_A ~ (A + lambda_A I)^-1 with the pair

    s_A = H_A a_hat,    y_A = A s_A + lambda_A s_A,

where A is the CURRENT mini-batch's input factor and a_hat the mean input (patch) vector. Both come
from the same rows as kronograph's own A factor (runtime/factors.py ``site_rows``): one row p per
(example, position), the homogeneous 1 appended when the layer has a bias, split per group.

Normalisation (the same as ``factors.batch_factors``, hence A s here equals ``batch_factors(...)[0] @ s``
to rounding): with m the number of examples used and R the total number of rows of all sites,

    A s = (1/m) sum_rows p (p^T s),        a_hat = (1/R) sum_rows p.

For a linear layer on [n, in] inputs R = m. For a convolution (KFC) the rows are the patches of every
output location t in T, so A s = (1/m) sum_{i,t} a_{i,t} (a_{i,t}^T s): a SUM over locations, NOT divided
by |T|. This is the thesis's own definition, (3.9) A := E_n[sum_{t in T} A_{t,t}(n)] and (3.15)
A s_A = E_n[sum_{t in T} (a_t(n)^T s_A) a_t(n)]; its rebalancing of A and G for conv layers
(lambda_A = sqrt|T| sqrt(lambda), lambda_G = sqrt(lambda) / sqrt|T|, Algorithm 9 line 2) is carried by
the damping terms, not by a rescaled A. a_hat, on the other hand, IS averaged over locations:
a_hat = E_n[(1/|T|) sum_t a_t(n)] (the text after (3.14)), i.e. the mean of all rows. Inputs with extra
sequence positions ([n, T, in], or [n * T, in] batch-major) and weights with several sites are treated
as factors.py treats them: more positions of the same example (summed in A, averaged in a_hat).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kronograph.passes.plan import Layer
from kronograph.runtime.capture import SiteRecord
from kronograph.runtime.factors import SiteRows, layer_rows


@dataclass
class LayerRows:
    """A layer's rows of one pass, gathered once (``gather_rows``) for several of the functions below."""

    sites: list[SiteRows]
    m: int  # examples used
    rows: int  # total rows R of all sites


def gather_rows(layer: Layer, records: SiteRecord | Sequence[SiteRecord], batch_size: int,
                index: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                with_gradient: bool = False) -> LayerRows:
    """The rows of every site of ``layer`` (conv patches extracted once), with the gradient rows on request."""
    records = [records] if isinstance(records, SiteRecord) else list(records)
    return LayerRows(*layer_rows(layer, records, batch_size, index, dtype, with_gradient=with_gradient))


def _rows(
    layer: Layer, records: SiteRecord | Sequence[SiteRecord] | LayerRows, batch_size: int,
    index: torch.Tensor | None, dtype: torch.dtype,
) -> tuple[list[torch.Tensor], int, int]:
    """The activation rows P [groups, R_site, a_dim] of every site (gathered now unless given), m and R."""
    rows = records if isinstance(records, LayerRows) else gather_rows(layer, records, batch_size, index, dtype)
    return [site.p.to(dtype) for site in rows.sites], rows.m, rows.rows


def _as_grouped(layer: Layer, s: torch.Tensor) -> tuple[torch.Tensor, bool, bool]:
    """s as [groups, a_dim, k]; returns (view, had a group axis, was a vector)."""
    groups, d = layer.groups, layer.a_dim
    grouped = groups > 1 or s.dim() == 3
    if grouped:
        vector = s.dim() == 2
        view = s.unsqueeze(-1) if vector else s
        expected = "[groups, a_dim] or [groups, a_dim, k]"
    else:
        vector = s.dim() == 1
        view = (s.unsqueeze(-1) if vector else s).unsqueeze(0)
        expected = "[a_dim] or [a_dim, k]"
    if view.dim() != 3 or view.shape[0] != groups or view.shape[1] != d:
        raise ValueError(
            f"layer {layer.name!r}: s of shape {tuple(s.shape)} does not fit {expected} with groups={groups}, a_dim={d}"
        )
    return view, grouped, vector


def input_factor_action(
    layer: Layer,
    records: SiteRecord | Sequence[SiteRecord] | LayerRows,
    s: torch.Tensor,
    *,
    batch_size: int,
    index: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A s for the mini-batch input factor A of ``layer`` (the one ``factors.batch_factors`` returns),
    computed as (1/m) sum_sites P^T (P s) from the activation rows P, without ever forming the
    a_dim x a_dim matrix A (cost O(R a_dim k), memory O(R a_dim) for the rows / conv patches).

    Args:
        layer: the plan's Layer (kind, bias, groups, conv geometry as factors.py reads them).
        records: the layer's captured site(s) (only their inputs ``a`` and conv ``geometry`` are read;
            no gradient is needed), or their rows already gathered by ``gather_rows`` (then ``batch_size``
            and ``index`` are those rows' own).
        s: [a_dim] or [a_dim, k] for an ungrouped layer; [groups, a_dim] or [groups, a_dim, k] for a
            grouped convolution (one block per group, as kronograph's A [groups, a_dim, a_dim]).
            a_dim includes the homogeneous coordinate when the layer has a bias.
        batch_size, index: as in ``batch_factors`` (the n of the forward; the examples used).
        dtype: the computation's and result's dtype; default s's dtype.

    Returns:
        A s, the shape of s. For conv layers A sums over output locations (no 1/|T|): see the module
        docstring (thesis eqs. (3.9), (3.15)).
    """
    dtype = s.dtype if dtype is None else dtype
    view, grouped, vector = _as_grouped(layer, s)
    view = view.to(dtype)
    parts, m, _ = _rows(layer, records, batch_size, index, dtype)
    total = None
    for p in parts:  # p [groups, R, d]: p^T (p s), two skinny products
        part = torch.bmm(p.transpose(1, 2), torch.bmm(p, view.to(p.device)))
        total = part if total is None else total + part
    total = total / m
    if vector:
        total = total.squeeze(-1)
    return total if grouped else total.squeeze(0)


def mean_input(
    layer: Layer,
    records: SiteRecord | Sequence[SiteRecord] | LayerRows,
    *,
    batch_size: int,
    index: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """a_hat = E_n[(1/|T|) sum_t a_t(n)]: the mean of all activation rows (patches for conv layers),
    homogeneous 1 included when the layer has a bias. Shape [a_dim], or [groups, a_dim] for a grouped
    convolution. Same arguments as ``input_factor_action``."""
    parts, _, rows = _rows(layer, records, batch_size, index, dtype)
    total = sum(p.sum(dim=1) for p in parts) / rows
    return total if layer.groups > 1 else total.squeeze(0)


def input_secant_pair(
    layer: Layer,
    records: SiteRecord | Sequence[SiteRecord] | LayerRows,
    h_a: torch.Tensor,
    damping: float,
    *,
    batch_size: int,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K-BFGS's pair (3.14) for updating H_A: s_A = H_A a_hat, y_A = A s_A + lambda_A s_A, with A and
    a_hat from the current mini-batch (A never formed). ``h_a``: [a_dim, a_dim] or [groups, a_dim, a_dim]
    (its dtype is used); ``damping``: lambda_A (the thesis uses sqrt|T| sqrt(lambda) for conv layers,
    sqrt(lambda) for linear ones). Returns (s_A, y_A) shaped like a_hat."""
    a_hat = mean_input(layer, records, batch_size=batch_size, index=index, dtype=h_a.dtype).to(h_a.device)
    s_a = (h_a @ a_hat.unsqueeze(-1)).squeeze(-1)
    y_a = input_factor_action(layer, records, s_a, batch_size=batch_size, index=index) + damping * s_a
    return s_a, y_a
