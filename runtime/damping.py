"""The two damping rules of the paper: lambda by Levenberg-Marquardt (sec 6.5), gamma by trial (sec 6.6)."""

from __future__ import annotations

import math

from kronograph.runtime.inverse import factor_trace


#: The Levenberg-Marquardt rule's verdicts: the quadratic model is trusted above this rho, distrusted below that.
TRUSTED_RHO, DISTRUSTED_RHO = 0.75, 0.25


def levenberg_marquardt(damping: float, rho: float, omega: float, minimum: float = 0.0) -> float:
    """Shrink lambda by omega (< 1) when rho > 3/4 (the quadratic model is trustworthy), grow it by 1/omega
    when rho < 1/4, where rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0))."""
    if rho > TRUSTED_RHO:
        return max(minimum, damping * omega)
    if rho < DISTRUSTED_RHO:
        return damping / omega
    return damping


def largest_credible_decrease(objective: float) -> float:
    """The most a step's quadratic model may predict h to fall, h / (1/4): h is nonnegative (every loss is, and the
    l2 term), so a step falls by at most h, and a predicted fall beyond h / (1/4) has rho < 1/4 whatever the step
    does: the model is distrusted before the step is tried. Where it happens the model has missed curvature (a
    saturated softmax on a wrong label: its Fisher vanishes, its gradient does not), and the predicted 1e4 h of a
    fitted deep tanh net's outlier took a step that wrecked the fit."""
    return objective / DISTRUSTED_RHO


#: float32's unit roundoff: the losses are float32 sums, so h resolves relative changes no finer than this.
_FLOAT32_ROUNDOFF = 2.0**-24


def rounding_of_h(*values: float, roundings: int = 16) -> float:
    """A few float32 roundings of the largest of ``values`` (h before and after a step, and the loss's floor,
    ``Loss.rounding_floor``): changes of h below this are rounding noise. The floor counts because some losses
    keep an absolute error however small they get: near a perfect fit each example's cross-entropy, a log-sum-exp
    minus the label's logit, is a multiple of 2^-24, so h moves in steps of 2^-24 / n at a loss of 1e-9."""
    return roundings * _FLOAT32_ROUNDOFF * max(abs(value) for value in values)


def below_rounding(objective: float, after: float, decrease: float, floor: float = 0.0, roundings: int = 16) -> bool:
    """Whether a step left h exactly as it was, or changed it, and was predicted to, by no more than a few float32
    roundings of h (``rounding_of_h``, with the loss's ``floor``). rho = (after - objective) / decrease is then
    rounding noise (a batch fitted to a loss of 1e-10: the paper's rule reads rho = 0 as distrust and grows lambda
    every step, by the accelerated rule past 1e300 within a few thousand steps, where no later step can bring it
    back)."""
    if after == objective:
        return True  # nothing float32 h can show changed (a loss that rounds to 0 stays 0 whatever was predicted)
    resolution = rounding_of_h(objective, after, floor, roundings=roundings)
    return abs(after - objective) <= resolution and -decrease <= resolution


def lm_omega(every: int) -> float:
    """omega1 = (19/20)^T1: the paper's decay for an adjustment every T1 steps."""
    return (19 / 20) ** every


def gamma_candidates(gamma: float, every: int, power: int = 1) -> list[float]:
    """The three strengths tried every T2 steps: gamma, omega2 gamma and gamma / omega2, omega2 = sqrt(19/20)^T2
    (raised to ``power`` while the same side keeps winning: ``gamma_power``)."""
    omega2 = (math.sqrt(19 / 20) ** every) ** power
    return [gamma, omega2 * gamma, gamma / omega2]


def gamma_power(streak: int, cap: int) -> int:
    """The power of omega2 in the next candidates: 1 + the number of rounds the same side has won, at most cap."""
    return min(abs(streak) + 1, cap)


def _extend(streak: int, side: int) -> int:
    """A signed streak after a verdict on ``side`` (+1, -1, or 0 for neutral, which resets it)."""
    if side == 0:
        return 0
    return streak + side if streak * side > 0 else side


def gamma_interval(interval: int, streak: int, shortest: int, longest: int | None) -> int:
    """Steps to the next gamma-rule round, given the rounds' signed ``streak`` after this one: T_2 (``shortest``)
    while one side has won at least twice running (gamma is on its way somewhere), otherwise (gamma kept, or a
    move against the last one: gamma has found its range and the verdicts are the batches' noise) double the
    interval, up to ``longest``; always T_2 when ``longest`` is None (the paper's). A settled gamma then costs
    the rule's extra inverses a quarter as often; a moving one is tried as often as before."""
    if longest is None or abs(streak) >= 2:
        return shortest
    return max(shortest, min(2 * interval, longest))


def gamma_streak(streak: int, chosen: int) -> int:
    """The signed count of consecutive rounds won by the smaller (+) or the larger (-) candidate; ``chosen``
    is the index in ``gamma_candidates`` (0: gamma kept, which resets the count)."""
    return _extend(streak, {0: 0, 1: 1, 2: -1}[chosen])


def accelerated_levenberg_marquardt(damping: float, rho: float, omega: float, streak: int, cap: int,
                                    minimum: float = 0.0) -> tuple[float, int]:
    """The LM rule whose step grows while rho keeps giving the same verdict: the j-th consecutive shrink
    (or growth) moves lambda by omega^min(j, cap) instead of omega, so a lambda that starts orders of
    magnitude off reaches its range in a few dozen steps; a neutral rho (or a change of verdict) resets
    the streak, and the rule is the paper's again (cap = 1 is exactly ``levenberg_marquardt``).

    ``streak`` is signed: +j after j consecutive shrinks, -j after j consecutive growths. Returns the new
    lambda and streak.
    """
    streak = _extend(streak, 1 if rho > TRUSTED_RHO else -1 if rho < DISTRUSTED_RHO else 0)
    return levenberg_marquardt(damping, rho, omega ** min(max(abs(streak), 1), cap), minimum), streak


def curvature_scale(blocks) -> float:
    """The mean eigenvalue of the Kronecker-factored Fisher, sum tr(A) tr(G) / sum dim(A) dim(G) over the
    blocks (and their groups): the scale on which a Tikhonov lambda is large or small."""
    trace, dimension = 0.0, 0
    for block in blocks:
        if block.a is None:
            continue
        a_traces, g_traces = factor_trace(block.a).double(), factor_trace(block.g).double()
        trace += float((a_traces * g_traces).sum())
        dimension += block.a.shape[0] * block.a.shape[-1] * block.g.shape[-1]
    return trace / dimension if dimension else 0.0
