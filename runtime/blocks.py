"""KroneckerBlock: one layer's curvature state (factor EMAs, damped inverses) and its public verbs.

A block keeps A [groups, a_dim, a_dim] (a table's as its diagonal, [groups, a_dim]: ``Layer.diagonal_a``) and
G [groups, g_dim, g_dim] as exponential moving averages
in its own dtype (float32 by default, float64 on request; independent of the model's), the damped
inverses of the last ``invert``, and turns itself into the dense matrix it stands for (tests).

Dense convention: the block of group k is A_k kron G_k acting on vec(W_bar_k), vec stacking columns
(runtime/wbar.py); over groups the matrix is block-diagonal in group order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import warnings

import torch

from kronograph.passes.plan import Layer
from kronograph.runtime.capture import SiteRecord
from kronograph.runtime.factors import RowSubset, ema_, fold_factors_, mirror_upper_
from kronograph.runtime.inverse import (
    DampedInverses,
    StatisticsWarning,
    all_finite,
    factored_inverses,
    precondition,
    trace_pi,
)
from kronograph.runtime.tied import TiedInverses
from kronograph.runtime.wbar import gather_grad, scatter


class KroneckerBlock:
    """Curvature of one Layer: A, G (EMAs), their damped inverses and the preconditioner they define."""

    def __init__(self, layer: Layer, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"factor dtype must be float32 or float64, got {dtype}")
        self.layer = layer
        self.dtype = dtype
        self.device = device
        self._a: torch.Tensor | None = None
        self._g: torch.Tensor | None = None
        self._stale = False  # the EMAs' lower triangles lag their upper ones (update folds the upper only)
        self.inverses: DampedInverses | TiedInverses | None = None  # a tie's views share one TiedInverses
        self.updates = 0  # number of statistics updates folded into the EMAs
        self.tied = False  # one of a tied table's two views (runtime/tied.py): solved with the other, never alone
        # A's and G's diagonal blocks where the statistics form those alone: exactly the blocks the inversion reads
        # (BlockDiagonalCurvature sets them; None: whole)
        self.statistics_blocks: tuple[tuple[int, ...] | None, tuple[int, ...] | None] = (None, None)

    # -- factors: the EMAs, mirrored when read ------------------------------------------------------
    def _mirrored(self, factor: torch.Tensor | None) -> torch.Tensor | None:
        if self._stale:
            if self._a.dim() == 3:  # a table's A is its diagonal [groups, rows]
                mirror_upper_(self._a)
            if self._g.dim() == 3:  # a wide head's G is its diagonal [groups, g_dim] (Layer.diagonal_g)
                mirror_upper_(self._g)
            self._stale = False
        return factor

    @property
    def estimated(self) -> bool:
        """Whether statistics have been folded in (without mirroring the EMAs, as reading ``a`` would)."""
        return self._a is not None

    @property
    def by_rows(self) -> bool:
        """Whether sec 8's low-rank product may solve its gradient from the batch's rows: not where A is a
        diagonal factor (its solve is as cheap whole), nor for a tie's view (its block is the two views' sum) or a
        layer of a computed weight (its gradient reaches W through its parameters: runtime/weight_norm.py,
        runtime/spectral_norm.py)."""
        return not (self.layer.diagonal_a or self.layer.diagonal_g or self.tied or self.layer.computed)

    @property
    def a(self) -> torch.Tensor | None:
        """The EMA of A [groups, a_dim, a_dim], symmetric (a table's: its diagonal, [groups, a_dim])."""
        return self._mirrored(self._a)

    @a.setter
    def a(self, value: torch.Tensor | None) -> None:
        self._mirrored(None)
        self._a = value

    @property
    def g(self) -> torch.Tensor | None:
        """The EMA of G [groups, g_dim, g_dim], symmetric."""
        return self._mirrored(self._g)

    @g.setter
    def g(self, value: torch.Tensor | None) -> None:
        self._mirrored(None)
        self._g = value

    # -- statistics ---------------------------------------------------------------------------------
    def update(
        self,
        records: Sequence[SiteRecord],
        *,
        batch_size: int,
        decay: float,
        grad_scale: float | None = None,
        index: torch.Tensor | None = None,
        subset: RowSubset | None = None,
    ) -> bool:
        """Fold the mini-batch factors of captured sites into the EMAs in place (factors.fold_factors_; A from
        a random ``subset`` of the rows where there are many); False (and a StatisticsWarning) when the batch's
        statistics were not finite and were left out."""
        folded = fold_factors_(
            self.layer, records, self._a, self._g, decay=decay, batch_size=batch_size, grad_scale=grad_scale,
            index=index, dtype=self.dtype, device=self.device, mirror=False, subset=subset,
            blocks=self.statistics_blocks,
        )
        if folded is None:
            self._warn_non_finite()
            return False
        self._a, self._g = folded
        self._stale = True
        self.updates += 1
        return True

    def update_factors(self, a: torch.Tensor, g: torch.Tensor, decay: float, in_place: bool = True) -> bool:
        """new = decay * old + (1 - decay) * batch for both factors (the first update copies the batch).

        A batch with NaN/Inf in either factor is not folded in (a poisoned EMA would never recover):
        returns False and raises a StatisticsWarning through ``warnings``. ``in_place=False`` writes the new
        EMAs into the batch's tensors, which the caller hands over, and leaves the old ones untouched, so that a
        caller holding them can put them back if its step fails later (KFACPreconditioner's steps are atomic).
        """
        device = self.device if self.device is not None else a.device
        a, g = a.to(device=device, dtype=self.dtype), g.to(device=device, dtype=self.dtype)
        if not all_finite((a, g)):
            self._warn_non_finite()
            return False
        if in_place:
            self.a, self.g = ema_(self.a, a, decay), ema_(self.g, g, decay)
        elif self.a is None or decay == 0:  # the batch is the estimate (decay 0 replaces even a non-finite EMA)
            self.a, self.g = a, g
        else:  # decay old + (1 - decay) batch, written over the batch: no copy of the old EMAs
            self.a = a.mul_(1.0 - decay).add_(self.a, alpha=decay)
            self.g = g.mul_(1.0 - decay).add_(self.g, alpha=decay)
        self.updates += 1
        return True

    def _warn_non_finite(self) -> None:
        warnings.warn(
            f"K-FAC block {self.layer.name}: non-finite statistics in this mini-batch; the factors keep "
            "their previous estimate",
            StatisticsWarning,
            stacklevel=3,
        )

    # -- inverses and preconditioning ---------------------------------------------------------------
    def invert(self, gamma: float, knob: str = "factor_damping", max_dim: int | None = None) -> bool:
        """Recompute the damped inverses with strength gamma (a factor wider than ``max_dim`` block-diagonally);
        False (and an InverseWarning naming ``knob``, the caller's setting for gamma) if a group kept its previous
        inverse because its factors were not finite or not positive definite."""
        if self.a is None or self.g is None:
            raise RuntimeError(f"block {self.layer.name!r} has no statistics yet; update it before invert")
        self.inverses = factored_inverses(self.a, self.g, gamma, self.inverses, name=self.layer.name, knob=knob,
                                          max_dim=max_dim)
        return self.inverses.ok

    @property
    def pi(self) -> torch.Tensor | None:
        return None if self.inverses is None else self.inverses.pi

    def precondition(self, grad_bar: torch.Tensor) -> torch.Tensor:
        """(G + gamma/pi I)^-1 grad_W_bar (A + pi gamma I)^-1 per group (no minus sign), in the block's dtype (a
        tie's: runtime/tied.py's solve)."""
        if self.inverses is None:
            raise RuntimeError(f"block {self.layer.name!r} has no inverses yet; call invert first")
        if isinstance(self.inverses, TiedInverses):  # a tie's output view: the two uses' block
            return self.inverses.solve(grad_bar)
        return precondition(grad_bar, self.inverses)

    def precondition_grads(self, params: Mapping[str, torch.nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The preconditioned .grad of the layer's weight and bias, shaped as those parameters."""
        return scatter(self.layer, self.precondition(gather_grad(self.layer, params)))

    # -- dense forms (tests, small models) ----------------------------------------------------------
    def to_dense(self, gamma: float | None = None) -> torch.Tensor:
        """A kron G (or, with gamma, the damped (A + pi gamma I) kron (G + gamma/pi I)), block-diagonal
        over groups, in the vec convention of runtime/wbar.py."""
        if self.a is None or self.g is None:
            raise RuntimeError(f"block {self.layer.name!r} has no statistics yet")
        a, g = self.a, self.g
        if a.dim() == 2:  # a table's diagonal A
            a = torch.diag_embed(a)
        if g.dim() == 2:  # a wide head's diagonal G
            g = torch.diag_embed(g)
        if gamma is not None:
            pi = trace_pi(a, g)[:, None, None]
            a = a + pi * gamma * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            g = g + gamma / pi * torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
        return torch.block_diag(*[torch.kron(a_k, g_k) for a_k, g_k in zip(a, g)])

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # copies, a snapshot: KFAC folds into the EMAs in place, KFACPreconditioner writes the next batch's factors
        # into the ones a step replaced
        a, g = self.a, self.g
        state: dict[str, Any] = {"a": None if a is None else a.clone(), "g": None if g is None else g.clone(),
                                 "updates": self.updates}
        if isinstance(self.inverses, TiedInverses):
            state["tied"] = self.inverses.state_dict()
        elif self.inverses is not None:
            state.update(a_inv=self.inverses.a_inv, g_inv=self.inverses.g_inv, pi=self.inverses.pi,
                         a_blocks=self.inverses.a_blocks, g_blocks=self.inverses.g_blocks)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        def own(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.detach().clone().to(self.dtype)

        self.a, self.g, self.updates = own(state["a"]), own(state["g"]), int(state["updates"])
        self.inverses = None
        if "tied" in state:
            self.inverses = TiedInverses.from_state({key: own(value) for key, value in state["tied"].items()})
        elif "a_inv" in state:
            pi = own(state["pi"])
            failed = torch.zeros(pi.shape[0], dtype=torch.bool, device=pi.device)
            blocks = [None if state.get(key) is None else tuple(int(w) for w in state[key])  # (as they are multiplied)
                      for key in ("a_blocks", "g_blocks")]
            self.inverses = DampedInverses(own(state["a_inv"]), own(state["g_inv"]), pi, failed, *blocks)
