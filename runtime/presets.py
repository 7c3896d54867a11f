"""K-FAC's settings as one typed frozen dataclass, and the two named presets users choose between.

- ``"default"``: the recommended first try on any model (issue 10): lambda starts from the curvature's own
  scale (so the loss's reduction and the batch size do not decide it), Levenberg-Marquardt every step and
  the gamma rule every 5 steps, both with moves that grow while the verdict stays the same (up to omega^8),
  inverses also refreshed when gamma has moved by 2x, steps that make h worse undone, and sub-batches
  never smaller than the paper's own advice for small batches (sec 8: tau_2 = 1), and the quadratic model's
  coefficients bounded: K-FAC's proposal and the unmatched parameters' gradient step never taken uphill, an
  ill-conditioned system (nearly parallel directions) solved without one of them, and gamma's damping of A
  applied in coordinates centred on the layer's mean input (sigmoid units near 1/2 no longer hide their
  variation under a damping sized by their mean; the paper's sec 10 invariance kept under damping), and the
  parameters outside every block (norms, embeddings) stepping along RMSprop's shape of their gradient, and the
  update shortened by (1 + s) / 2 where s, the share of signal in the batch's natural gradient, says the
  quadratic model's step fits the mini-batch's noise (``signal_scaling``).
- ``"paper"``: Martens & Grosse (2015) sec 13 exactly (lambda = 150, T1 = 5, T2 = T3 = 20, tau_1 = 1/8,
  tau_2 = 1/4, the three-candidate gamma rule), the algorithm the dense-maths tests pin down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from kronograph.errors import KronographError


@dataclass(frozen=True)
class KFACSettings:
    """Every K-FAC setting (``KFAC``'s docstring says what each one does)."""

    lr: float = 1.0
    damping: float | None = None  # None: relative_damping times the curvature's mean eigenvalue at step 1
    relative_damping: float = 1.0
    factor_damping: float | None = None
    weight_decay: float = 0.0
    ema_decay: float | None = None
    fisher: str = "mc"
    stats_fraction: float = 1 / 8
    qmodel_fraction: float = 1 / 4
    min_stats_examples: int = 64
    min_qmodel_examples: int = 256
    stats_every: int = 1
    inverse_every: int = 20
    momentum: str | float | None = "qmodel"
    rescale: bool = True
    adapt_damping: bool | None = None
    adapt_gamma: bool | None = None
    damping_every: int = 1
    gamma_every: int = 5
    lm_acceleration: int = 8
    refresh_ratio: float | None = 2.0
    reject_steps: bool = True
    reject_rho: float = -0.5
    reject_rise: float = 0.25
    descent_only: bool = True
    centered_damping: bool = True
    unmatched_direction: str = "rms"
    signal_scaling: bool = True
    fisher_products: str = "forward"
    max_condition: float | None = 1e8
    min_damping: float = 1e-8
    factor_dtype: torch.dtype = torch.float32
    structure: str = "diagonal"


PRESETS: dict[str, KFACSettings] = {
    "default": KFACSettings(),
    "paper": KFACSettings(
        damping=150.0, min_stats_examples=1, min_qmodel_examples=1, damping_every=5, gamma_every=20,
        lm_acceleration=1, refresh_ratio=None, reject_steps=False,
        descent_only=False, max_condition=None, centered_damping=False, unmatched_direction="gradient",
        signal_scaling=False,
    ),
}
SETTING_NAMES = tuple(field.name for field in dataclasses.fields(KFACSettings))


class _FromPreset:
    """The default of every KFAC argument: "take the value of the chosen preset"."""

    def __repr__(self) -> str:
        return "<from preset>"


FROM_PRESET: Any = _FromPreset()


def settings_for(preset: str, overrides: dict[str, Any]) -> KFACSettings:
    """The preset's settings with the arguments the caller gave (those not ``FROM_PRESET``) replacing them."""
    if preset not in PRESETS:
        raise KronographError(f"preset={preset!r}; choose one of {', '.join(PRESETS)}")
    given = {key: value for key, value in overrides.items() if value is not FROM_PRESET}
    return dataclasses.replace(PRESETS[preset], **given)
