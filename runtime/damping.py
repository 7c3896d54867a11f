"""The two damping rules of the paper: lambda by Levenberg-Marquardt (sec 6.5), gamma by trial (sec 6.6)."""

from __future__ import annotations

import math


def levenberg_marquardt(damping: float, rho: float, omega: float, minimum: float = 0.0) -> float:
    """Shrink lambda by omega (< 1) when rho > 3/4 (the quadratic model is trustworthy), grow it by 1/omega
    when rho < 1/4, where rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0))."""
    if rho > 0.75:
        return max(minimum, damping * omega)
    if rho < 0.25:
        return damping / omega
    return damping


def lm_omega(every: int) -> float:
    """omega1 = (19/20)^T1: the paper's decay for an adjustment every T1 steps."""
    return (19 / 20) ** every


def gamma_candidates(gamma: float, every: int) -> list[float]:
    """The three strengths tried every T2 steps: gamma, omega2 gamma and gamma / omega2, omega2 = sqrt(19/20)^T2."""
    omega2 = math.sqrt(19 / 20) ** every
    return [gamma, omega2 * gamma, gamma / omega2]
