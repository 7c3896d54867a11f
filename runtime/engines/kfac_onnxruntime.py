"""runtime/engines/kfac_onnxruntime: K-FAC on the onnxruntime engine (empirical Fisher, no re-scaling).

``OnnxKFAC(engine, lr, factor_damping, ...)`` runs the same K-FAC runtime as ``runtime.kfac.KFAC`` with
``fisher="empirical"``, ``stats_fraction=1``, ``rescale=False`` on an ``OnnxRuntimeEngine``:

1. one ``engine.forward_backward`` gives the mean loss, every site's taps (a, dL/ds) and the gradients;
2. (every ``stats_every`` steps) the taps become SiteRecords (geometry: the layer's plan geometry) and are
   folded into the factors' EMAs (``runtime.statistics.ema_decay``), with grad_scale = n because the
   taps are gradients of the mean loss (times sqrt(T) for cross-entropy over T positions, as torch does);
3. damped inverses with strength gamma at steps 1-3 and every ``inverse_every``;
4. Delta = -F^-1 (grad + eta theta) per layer (curvature.direction); parameters of no
   layer take -(grad + eta theta);
5. delta = lr * Delta (+ momentum * previous delta, heavy ball); theta += delta via ``set_parameters``.

Not available on this engine yet (they need exact-Fisher products or a sampled-target backward that the
instrumented graph does not provide): re-scaling (sec 6.4), quadratic-model momentum (sec 7), adaptive
damping (6.5, 6.6), Monte-Carlo sampled targets (``fisher="mc"``), random statistics subsets
(tau_1 < 1) and the block-tridiagonal structure. Asking for any of them raises KronographError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kronograph.errors import KronographError
from kronograph.runtime.capture import SiteRecord
from kronograph.runtime.curvature import BlockDiagonalCurvature
from kronograph.runtime.inverse import all_finite
from kronograph.runtime.losses import get_loss
from kronograph.runtime.statistics import ema_decay, inverses_due, statistics_due
from kronograph.runtime.kfac import heavy_ball

__all__ = ["OnnxKFAC"]

Direction = dict[str, torch.Tensor]


class OnnxKFAC:
    """K-FAC with the empirical Fisher and without re-scaling for an ``OnnxRuntimeEngine``.

    Re-scaling, qmodel momentum, adaptive damping and MC-sampled targets are NOT available on this engine
    yet; the corresponding arguments exist only to refuse them with a KronographError.

    Args:
        engine: the OnnxRuntimeEngine; its weights are updated through ``set_parameters``.
        lr: multiplies the proposal Delta.
        factor_damping: gamma, the factored Tikhonov damping of the inverses.
        weight_decay: eta; eta * theta is added to the gradient.
        ema_decay: fixed EMA decay of the factors; None: the paper's min(1 - 1/k, 0.95).
        stats_every, inverse_every: how often the statistics and the inverses are refreshed.
        momentum: None or a heavy-ball coefficient (float).
        factor_dtype: dtype of the factors and inverses.
        fisher, rescale, adapt_damping, adapt_gamma, stats_fraction: only "empirical", False, False, False
            and 1.0 are supported.
    """

    def __init__(
        self,
        engine: Any,
        lr: float = 1.0,
        factor_damping: float = 1.0,
        weight_decay: float = 0.0,
        ema_decay: float | None = None,
        stats_every: int = 1,
        inverse_every: int = 20,
        momentum: float | None = None,
        factor_dtype: torch.dtype = torch.float32,
        *,
        fisher: str = "empirical",
        rescale: bool = False,
        adapt_damping: bool = False,
        adapt_gamma: bool = False,
        stats_fraction: float = 1.0,
    ) -> None:
        if fisher != "empirical":
            raise KronographError(
                f"fisher={fisher!r}: the onnxruntime engine has no sampled-target backward yet; use 'empirical'"
            )
        if rescale or momentum == "qmodel":
            raise KronographError(
                "re-scaling and momentum='qmodel' need exact-Fisher products, which the onnxruntime engine does "
                "not provide yet; use rescale=False and a float (heavy-ball) momentum or None"
            )
        if adapt_damping or adapt_gamma:
            raise KronographError("adaptive damping (lambda or gamma) is not available on the onnxruntime engine yet")
        if stats_fraction != 1.0:
            raise KronographError("the onnxruntime engine takes the statistics on the whole batch (stats_fraction=1)")
        if momentum is not None and not isinstance(momentum, (int, float)):
            raise KronographError(f"momentum={momentum!r}; choose a float or None")
        if factor_damping is None or float(factor_damping) <= 0:
            raise KronographError("factor_damping (gamma) must be a positive number on the onnxruntime engine")
        for name, value in (("stats_every", stats_every), ("inverse_every", inverse_every)):
            if int(value) < 1:
                raise KronographError(f"{name}={value} must be a positive number of steps")
        self.engine = engine
        self.compiled = engine.compiled
        self.lr, self.gamma = float(lr), float(factor_damping)
        self.weight_decay = float(weight_decay)
        self.ema_decay = ema_decay
        self.stats_every, self.inverse_every = int(stats_every), int(inverse_every)
        self.momentum = None if momentum is None else float(momentum)
        self.layers = tuple(self.compiled.layers)
        self.curvature = BlockDiagonalCurvature(self.layers, factor_dtype)
        covered = {n for layer in self.layers for n in (layer.weight, layer.bias) if n}
        self.unmatched = [name for name in engine.trainable if name not in covered]
        self.steps = 0
        self.stats_updates = 0
        self.previous: Direction | None = None

    @property
    def blocks(self) -> dict[str, Any]:
        return self.curvature.blocks

    def step(self, x: Any, y: Any) -> dict[str, Any]:
        """One K-FAC iteration on the batch (x, y) (numpy arrays or tensors); returns {"loss", ...}."""
        inputs = list(x) if isinstance(x, (tuple, list)) else [x]
        self.steps += 1
        k = self.steps
        result = self.engine.forward_backward(inputs, y)
        info: dict[str, Any] = {"loss": result.loss, "factor_damping": self.gamma}
        theta = {name: torch.from_numpy(value) for name, value in self.engine.parameters().items()}
        grads: Direction = {}
        for name in self.engine.trainable:
            grad = torch.from_numpy(np.asarray(result.gradients[name]))
            if self.weight_decay:
                grad = grad + self.weight_decay * theta[name]
            grads[name] = grad
        if not math.isfinite(result.loss) or not all_finite(grads.values()):
            info["skipped"] = "non-finite loss or gradient; the weights were left unchanged"
            return info
        if statistics_due(k, self.stats_every):
            self._fold(result.taps, y)
        refresh = inverses_due(k, self.inverse_every)
        inverses = self.curvature.invert(self.gamma) if refresh else self.curvature.current()
        update = self._update(grads, self._proposal(grads, inverses))
        if not all_finite(update.values()):
            info["skipped"] = "non-finite update; the weights were left unchanged"
            return info
        self.curvature.adopt(inverses)
        self.engine.set_parameters(
            {name: (theta[name] + update[name].to(theta[name].dtype)).numpy() for name in update}
        )
        self.previous = update
        return info

    # -- pieces -------------------------------------------------------------------------------------
    def _records(self, taps: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]) -> dict[str, list[SiteRecord]]:
        records: dict[str, list[SiteRecord]] = {}
        for layer in self.layers:
            sites = sorted(index for (name, index) in taps if name == layer.name)
            records[layer.name] = [
                SiteRecord(
                    layer=layer.name,
                    index=index,
                    a=torch.from_numpy(np.asarray(taps[(layer.name, index)][0])),
                    output=None,
                    geometry=layer.geometry,
                    g=torch.from_numpy(np.asarray(taps[(layer.name, index)][1])),
                )
                for index in sites
            ]
        return records

    def _fold(self, taps, y: Any) -> None:
        """The taps of the gradient pass (labels as targets) into the factors' EMAs."""
        targets = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y)
        n = int(targets.shape[0])
        scale = n * get_loss(self.compiled.loss).statistics_scale(targets)
        self.stats_updates += 1
        decay = ema_decay(self.stats_updates, self.ema_decay)
        self.curvature.fold(self._records(taps), n, decay, None, scale)

    def _proposal(self, grads: Direction, inverses: Any) -> Direction:
        proposal = self.curvature.direction(grads, inverses, {})
        proposal.update({name: -grads[name] for name in self.unmatched})
        return proposal

    def _update(self, grads: Direction, proposal: Direction) -> Direction:
        return heavy_ball(proposal, self.lr, self.momentum or 0.0, self.previous)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "stats_updates": self.stats_updates,
            "gamma": self.gamma,
            "previous": None if self.previous is None else {n: t.clone() for n, t in self.previous.items()},
            "curvature": self.curvature.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.stats_updates = int(state["steps"]), int(state["stats_updates"])
        self.gamma = float(state["gamma"])
        self.previous = None if state["previous"] is None else {n: t.clone() for n, t in state["previous"].items()}
        self.curvature.load_state_dict(state["curvature"])
