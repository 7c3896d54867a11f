"""The approximate Fisher of all layers: block-diagonal (paper sec 4.2) or block-tridiagonal (sec 4.3).

Both structures have the same verbs, so the optimizer does not care which it holds:
``fold`` the captured sites of a mini-batch into the EMAs, ``invert`` for a damping strength gamma (a
candidate, not yet kept), ``adopt`` the chosen inverses, ``solve`` F^-1 grad for the layers' W_bar
gradients (``direction``: the proposal -F^-1 grad shaped as the parameters), and ``state_dict``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Collection, Container, Mapping, Sequence
from typing import Any

import torch

from kronograph.passes.plan import Layer, Tie
from kronograph.runtime.blocks import KroneckerBlock
from kronograph.runtime.capture import SiteRecord
from kronograph.runtime.factors import RowSubset, ema_
from kronograph.runtime.inverse import (
    CoverageWarning,
    DampedInverses,
    InverseWarning,
    StatisticsWarning,
    all_finite,
    factor_trace,
    factored_inverses,
    inverse_blocks,
    precondition,
)
from kronograph.runtime.spectral_norm import has_sigma
from kronograph.runtime.tied import TiedInverses, tied_inverses
from kronograph.runtime.tridiagonal import TridiagonalInverse, TridiagonalInverseError, chain_factors, check_chain
from kronograph.runtime.wbar import gather, scatter

Records = Mapping[str, Sequence[SiteRecord]]
Rows = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def within_reach(layers: Sequence[Layer], largest: int | None) -> list[Layer]:
    """The layers whose factors are at most ``largest`` wide (None: all), warning (CoverageWarning) of each other
    one: it gets no Kronecker block, and its parameters are treated as those outside every block. A d-wide factor is
    4 d^2 bytes a copy, several copies at once (EMA, inverse, the gamma candidates'), and d^2 multiply-adds a row to
    form: a 50257-word head's G alone would be 10 GB a copy."""
    kept = []
    for layer in layers:
        a_width, g_width = 0 if layer.diagonal_a else layer.a_dim, 0 if layer.diagonal_g else layer.g_dim  # diagonals
        width = max(a_width, g_width)
        if largest is None or width <= largest:
            kept.append(layer)
            continue
        which = "A" if a_width >= g_width else "G"
        gib = 4 * width * width / 2**30
        warnings.warn(f"K-FAC: layer {layer.name!r} has a {width}-wide {which} factor ({gib:.1f} GiB a copy), wider "
                      f"than max_kronecker_dim={largest}: it gets no Kronecker block, its parameters are treated as "
                      "those outside every block; raise max_kronecker_dim to give it one", CoverageWarning,
                      stacklevel=3)
    return kept


def with_diagonal_g(layers: Sequence[Layer], largest: int | None, names: Collection[str] | None = None
                    ) -> list[Layer]:
    """The layers, each linear one (of ``names``, None: any) whose G alone is wider than ``largest`` with its G
    kept as its diagonal (``Layer.diagonal_g``), A whole: a word or BPE vocabulary's head, whose dense G costs C^2 a
    copy and a row to precondition (a 50257-wide one is 10 GB) while its output Fisher is nearly diagonal: a
    softmax's E[(p - y)(p - y)^T] is diag(p) - p p^T, whose off-diagonal entries shrink with the classes; a
    sigmoid's or squared error's is diagonal."""
    if largest is None:
        return list(layers)
    return [dataclasses.replace(layer, diagonal_g=True)
            if layer.kind == "linear" and layer.g_dim > largest and (names is None or layer.name in names) else layer
            for layer in layers]


def table_damping_scales(blocks: Mapping[str, KroneckerBlock]) -> dict[str, float]:
    """By table (an embedding or bag wider than 1024 rows, A kept as its diagonal; no tie's view), the factor
    sqrt(s / S) its gamma is scaled by, s = sqrt(mean eigenvalue of A x that of G) its block's scale and S the
    geometric mean of the other blocks'.

    Sec 6.3's factored damping (A + pi gamma I) kron (G + gamma / pi I) adds gamma / s relative to a block's own
    scale. A table's A counts how often each row is read: its trace is 1 a token whatever the vocabulary, so its
    mean eigenvalue is 1 / rows, and a 2048-word table's s is 0.06 of its LM's typical block (a mean bag's 0.02: its
    G carries the 1 / words weights too): one gamma damps it 16-50x harder than the rest, and its rows learn at
    gradient pace. Scaled by sqrt(s / S), its relative damping is the geometric mean of that and the typical
    block's; scaled by s / S (the typical block's itself), text-bag's loss after 2000 steps was worse on both
    seeds, the rare rows fitting each batch (BENCHMARKS.md)."""
    known = [name for name, block in blocks.items() if block.a is not None and block.g is not None and not block.tied]
    if not any(blocks[name].layer.diagonal_a for name in known):  # (no table: no trace read at each inversion)
        return {}
    scales = {name: torch.sqrt(_mean_eigenvalue(blocks[name].a) * _mean_eigenvalue(blocks[name].g)) for name in known}
    found = dict(zip(scales, torch.stack(list(scales.values())).tolist()))  # (one read from the device)
    usable = {name: s for name, s in found.items() if math.isfinite(s) and s > 0}
    others = [math.log(s) for name, s in usable.items() if not blocks[name].layer.diagonal_a]
    if not others:
        return {}
    typical = math.exp(sum(others) / len(others))
    return {name: math.sqrt(s / typical) for name, s in usable.items() if blocks[name].layer.diagonal_a}


def _mean_eigenvalue(factor: torch.Tensor) -> torch.Tensor:
    """tr / dim of a factor [groups, d, d] (or a diagonal one, [groups, d]), averaged over the groups, in float64."""
    return factor_trace(factor).double().mean() / factor.shape[-1]


def reachable_ties(ties: Sequence[Tie], largest: int | None, diagonal_from: int | None,
                   outputs: Collection[str]) -> tuple[Tie, ...]:
    """The ties that keep their block: each head's G kept as its diagonal above ``diagonal_from`` where the head is
    one of ``outputs`` (``with_diagonal_g``; a vocabulary's: the table's A is diagonal too, and the tie's row side
    then inverts as a diagonal, runtime/tied.py), and both views within ``largest`` (``within_reach``)."""
    ties = [dataclasses.replace(tie, output=with_diagonal_g([tie.output], diagonal_from, outputs)[0]) for tie in ties]
    return tuple(tie for tie in ties if len(within_reach(tie.views, largest)) == 2)


def normed_blocks(normed: Sequence[Layer], module: torch.nn.Module | None, weight_norm: bool,
                  spectral_norm: bool) -> tuple[Layer, ...]:
    """The plan's layers of a computed weight (``plan.normed``) that get blocks: weight norm's with ``weight_norm``,
    spectral norm's with ``spectral_norm`` where a PyTorch spectral norm of ``module`` computes the weight (its
    sigma can be read: runtime/spectral_norm.py)."""
    return tuple(layer for layer in normed if (layer.weight_norm and weight_norm)
                 or (layer.spectral_norm and spectral_norm and has_sigma(module, layer)))


class BlockDiagonalCurvature:
    """One KroneckerBlock per layer, inverted independently, but for a tied table's two views (``ties``: the
    output view's name -> the table view's), whose blocks are summed and inverted together (runtime/tied.py); the
    output view solves the tied weight's gradient, the table view solves nothing."""

    def __init__(self, layers: Sequence[Layer], dtype: torch.dtype, centered: bool = False,
                 knob: str = "factor_damping", floor: float = 0.0, max_dim: int | None = None,
                 ties: Sequence[Tie] = (), relative_tables: bool = False) -> None:
        self.blocks = {layer.name: KroneckerBlock(layer, dtype) for layer in layers}
        self.ties = {tie.output.name: tie.embedding.name for tie in ties
                     if tie.output.name in self.blocks and tie.embedding.name in self.blocks}
        for pair in self.ties.items():
            for name in pair:
                self.blocks[name].tied = True
        self.centered = centered  # damp A in coordinates centred on the mean input (inverse.factored_inverses)
        self.floor = floor  # each factor's damping >= floor times its mean eigenvalue (inverse.floored)
        self.max_dim = max_dim  # a wider factor is inverted block-diagonally (inverse.block_diagonal_inverse)
        self.knob = knob  # the owner's name for gamma, which a failed inversion's warning tells the user to raise
        self.relative_tables = relative_tables  # tables damped relative to their scale (``invert``)
        for block in self.blocks.values():  # the statistics form only what ``invert`` reads of a wider factor
            layer = block.layer
            if not block.tied:  # (a tie's sides are split over their whole width: runtime/tied.py)
                block.statistics_blocks = (
                    None if layer.diagonal_a else inverse_blocks(layer.a_dim, max_dim, border=self.centers(layer)),
                    None if layer.diagonal_g else inverse_blocks(layer.g_dim, max_dim))

    def centers(self, layer: Layer) -> bool:
        """Whether the layer's A is damped centred: its partition's border and its inversion both read this."""
        return self.centered and layer.bias is not None

    def fold(self, records: Records, batch_size: int, decay: float, index: torch.Tensor | None = None,
             grad_scale: float | None = None, subset: RowSubset | None = None) -> None:
        """Fold the captured sites (rows ``index`` of the batch) into every called layer's factors (a layer
        whose sites got no gradient, frozen before the first layer that learns, has nothing to fold; A from a
        random ``subset`` of a layer's rows where it has many, factors.RowSubset)."""
        for name, block in self.blocks.items():
            if records.get(name) and any(record.g is not None for record in records[name]):
                block.update(records[name], batch_size=batch_size, decay=decay, index=index, grad_scale=grad_scale,
                             subset=subset)

    def invert(self, gamma: float, only: Container[str] | None = None, g_shares: Mapping[str, float] | None = None
               ) -> dict[str, DampedInverses | None]:
        """Damped inverses for strength gamma (None for a layer never called: it has no statistics); ``only``: the
        layers to invert, None for the others (a data-parallel rank's share, runtime/data_parallel.py);
        ``g_shares``: by layer, G's damping at least this fraction of its trace (inverse.floored); with
        ``relative_tables``, a table's gamma scaled by ``table_damping_scales``."""
        scales = table_damping_scales(self.blocks) if self.relative_tables else {}
        inverses = {
            name: None if block.a is None or block.tied or (only is not None and name not in only)
            else factored_inverses(
                block.a, block.g, gamma * scales.get(name, 1.0), block.inverses, name=name,
                centered=self.centers(block.layer), knob=self.knob, floor=self.floor,
                max_dim=self.max_dim, g_share=(g_shares or {}).get(name, 0.0))
            for name, block in self.blocks.items()
        }
        for output_name, table_name in self.ties.items():
            output, table = self.blocks[output_name], self.blocks[table_name]
            if output.a is None or table.a is None or (only is not None and output_name not in only):
                continue
            previous = output.inverses if isinstance(output.inverses, TiedInverses) else None
            inverses[output_name] = inverses[table_name] = tied_inverses(
                (output.a, output.g), (table.a, table.g), gamma, previous, name=output.layer.weight,
                centered=self.centers(output.layer), floor=self.floor, max_dim=self.max_dim,
                g_share=(g_shares or {}).get(output_name, 0.0), knob=self.knob)
        return inverses

    def current(self) -> Any:
        return {name: block.inverses for name, block in self.blocks.items()}

    def unestimated(self) -> list[Layer]:
        """Layers with no statistics yet (not called in a statistics pass so far): no curvature to use."""
        unseen = {name for name, block in self.blocks.items() if not block.estimated}
        unseen |= {name for pair in self.ties.items() if unseen & set(pair) for name in pair}  # a tie's views as one
        return [block.layer for name, block in self.blocks.items() if name in unseen]

    def uninverted(self) -> list[str]:
        """Layers that have statistics but no inverse in use (first seen after the last refresh)."""
        return [name for name, block in self.blocks.items() if block.estimated and block.inverses is None]

    def adopt(self, inverses: Any) -> None:
        for name, block in self.blocks.items():
            block.inverses = inverses[name]

    def restricted(self, names: Container[str]) -> BlockDiagonalCurvature:
        """A shallow copy holding only the blocks of the layers ``names``: its verbs act on those layers."""
        subset = copy.copy(self)
        subset.blocks = {name: block for name, block in self.blocks.items() if name in names}
        subset.ties = {output: table for output, table in self.ties.items() if output in subset.blocks}
        return subset

    @property
    def solving(self) -> list[str]:
        """The blocks that solve a gradient: all but a tie's table view (its output view solves the weight)."""
        tables = set(self.ties.values())
        return [name for name in self.blocks if name not in tables]

    def solve(self, bars: Sequence[torch.Tensor], inverses: Any, rows: Rows,
              right_rows: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """F^-1 applied to each layer's grad W_bar (the ``solving`` blocks', in order); where ``rows`` holds the
        batch's (P, Q) of a layer, by the low-rank product of sec 8, (G^-1 Q^T)(P A^-1), whose P A^-1 is kept in
        ``right_rows`` when given (for ``quadratic_form_by_rows``). A layer without inverses keeps its gradient."""
        solved = []
        for name, bar in zip(self.solving, bars):
            inverse = inverses[name]
            if inverse is None:
                solved.append(bar)
            elif isinstance(inverse, TiedInverses):
                solved.append(inverse.solve(bar))
            elif name in rows:
                p_rows, q_rows = rows[name]
                right = inverse.times_a_inv(p_rows)
                if right_rows is not None:
                    right_rows[name] = right
                solved.append(inverse.g_inv_times(q_rows.transpose(1, 2)) @ right)
            else:
                solved.append(precondition(bar, inverse))
        return solved

    def quadratic_form_by_rows(self, rows: Rows, inverses: Any, right_rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """x^T F^-1 x summed over the layers of ``right_rows``, x = Q^T P a layer's gradient given by its ``rows``
        (P, Q), whose P A^-1 ``solve`` kept (the same P): tr((Q G^-1 Q^T)(P A^-1 P^T)) per group, R^2 (g + a) + R g^2
        multiply-adds against a solve's R (g^2 + a^2 + g a); no g x a matrix is formed."""
        total = torch.zeros((), dtype=torch.float64, device=next(iter(right_rows.values())).device)
        for name, right in right_rows.items():
            p_rows, q_rows = rows[name]
            left = q_rows @ inverses[name].g_inv_times(q_rows.transpose(1, 2))  # Q G^-1 Q^T [groups, R, R]
            total = total + (left * (right @ p_rows.transpose(1, 2)).transpose(1, 2)).sum(dtype=torch.float64)
        return total

    def direction(self, grads: Mapping[str, torch.Tensor], inverses: Any, rows: Rows,
                  right_rows: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The K-FAC proposal Delta = -F^-1 grad for every layer's weight and bias, shaped as the parameters
        (``right_rows``: see ``solve``)."""
        layers = [self.blocks[name].layer for name in self.solving]
        bars = [gather(layer, grads[layer.weight], grads[layer.bias] if layer.bias else None) for layer in layers]
        proposal: dict[str, torch.Tensor] = {}
        for layer, solved in zip(layers, self.solve(bars, inverses, rows, right_rows)):
            weight, bias = scatter(layer, solved)
            proposal[layer.weight] = -weight.to(grads[layer.weight].dtype)
            if layer.bias:
                proposal[layer.bias] = -bias.to(grads[layer.bias].dtype)
        return proposal

    def state_dict(self) -> dict[str, Any]:
        return {"blocks": {name: block.state_dict() for name, block in self.blocks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, block in self.blocks.items():
            block.load_state_dict(state["blocks"][name])
        for output, table in self.ties.items():  # the views share one inverse, kept in the output view's state
            self.blocks[table].inverses = self.blocks[output].inverses


class TridiagonalCurvature(BlockDiagonalCurvature):
    """A chain of linear layers (in plan order) with the cross moments of neighbours (sec 4.3)."""

    def __init__(self, layers: Sequence[Layer], dtype: torch.dtype) -> None:
        check_chain(layers)
        super().__init__(layers, dtype)
        self.cross: list[torch.Tensor] | None = None  # [A_01, A_12, ..., G_01, G_12, ...] EMAs
        self.inverse: TridiagonalInverse | None = None

    def fold(self, records: Records, batch_size: int, decay: float, index: torch.Tensor | None = None,
             grad_scale: float | None = None, subset: RowSubset | None = None) -> None:
        """Diagonal and cross moments from the same examples, folded in with one decay (Sigma stays PD); every
        row (``subset`` is not used: the cross moments pair each layer's rows with its neighbours')."""
        blocks = list(self.blocks.values())
        rows = (lambda t: t) if index is None else (lambda t: t[index])
        examples = batch_size if index is None else int(index.numel())
        a_diag, g_diag, a_cross, g_cross = chain_factors(
            [b.layer for b in blocks],
            [rows(records[b.layer.name][0].a) for b in blocks],
            [rows(records[b.layer.name][0].g) for b in blocks],
            grad_scale=grad_scale or examples,
            dtype=blocks[0].dtype,
        )
        if not all_finite([*a_diag, *g_diag, *a_cross, *g_cross]):
            warnings.warn("K-FAC: non-finite statistics in this mini-batch; the factors keep their estimate",
                          StatisticsWarning, stacklevel=3)
            return
        for block, a, g in zip(blocks, a_diag, g_diag):
            block.update_factors(a[None], g[None], decay)
        batch = [*a_cross, *g_cross]
        old = self.cross or [None] * len(batch)
        self.cross = [ema_(previous, new, decay) for previous, new in zip(old, batch)]

    def invert(self, gamma: float, g_shares: Mapping[str, float] | None = None) -> Any:
        """The tridiagonal inverse for gamma (sec 4.3), or where it fails the block-diagonal one (``g_shares``: the
        latter's only)."""
        if self.cross is not None:
            half = len(self.cross) // 2
            blocks = list(self.blocks.values())
            try:
                return TridiagonalInverse([b.a[0] for b in blocks], [b.g[0] for b in blocks],
                                          self.cross[:half], self.cross[half:], gamma, names=list(self.blocks))
            except TridiagonalInverseError as error:  # keep training: the block-diagonal inverse this time
                warnings.warn(f"K-FAC: {error}; using the block-diagonal inverse", InverseWarning, stacklevel=3)
        return super().invert(gamma, g_shares=g_shares)

    def current(self) -> Any:
        return self.inverse if self.inverse is not None else super().current()

    def uninverted(self) -> list[str]:
        return [] if self.inverse is not None else super().uninverted()

    def adopt(self, inverses: Any) -> None:
        if isinstance(inverses, TridiagonalInverse):
            self.inverse = inverses
        else:
            self.inverse = None
            super().adopt(inverses)

    def solve(self, bars: Sequence[torch.Tensor], inverses: Any, rows: Rows,
              right_rows: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        if isinstance(inverses, TridiagonalInverse):
            return inverses.apply(bars)
        return super().solve(bars, inverses, rows, right_rows)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "cross": None if self.cross is None else [c.clone() for c in self.cross],
            "tridiagonal": None if self.inverse is None else self.inverse.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.cross = None if state.get("cross") is None else [c.clone() for c in state["cross"]]
        saved = state.get("tridiagonal")
        self.inverse = None if saved is None else TridiagonalInverse.from_state_dict(saved)


def make_curvature(structure: str, layers: Sequence[Layer], dtype: torch.dtype, centered: bool = False,
                   floor: float = 0.0, max_dim: int | None = None, ties: Sequence[Tie] = (),
                   relative_tables: bool = False) -> BlockDiagonalCurvature:
    """"diagonal" or "tridiagonal" (the latter refuses layers that do not form a chain of linears);
    ``centered`` damping, the damping's ``floor``, the factors' blocking past ``max_dim``, the ``ties`` (whose
    views are among ``layers``) and ``relative_tables`` apply to the block-diagonal structure only."""
    if structure == "tridiagonal":
        return TridiagonalCurvature(layers, dtype)
    return BlockDiagonalCurvature(layers, dtype, centered, floor=floor, max_dim=max_dim, ties=ties,
                                  relative_tables=relative_tables)
