"""Factored Tikhonov damping (paper sec 6.3) and NaN-safe inverses of the damped Kronecker factors.

With strength gamma and pi = sqrt((tr A / dim A) / (tr G / dim G)), a block's damped inverse is
(A + pi gamma I)^-1 kron (G + (gamma / pi) I)^-1, applied to a gradient as
U = (G + (gamma/pi) I)^-1 grad_W_bar (A + pi gamma I)^-1. ``precondition`` returns U; the K-FAC
proposal is Delta = -U (the sign is left to the optimizer).

A table's A (an embedding wider than 1024 rows, ``Layer.diagonal_a``) is kept as its diagonal [groups, rows]: its
damped inverse is that diagonal's reciprocal, exactly (one-hot inputs make A diagonal), also [groups, rows].

Inverses are Cholesky-based (cholesky_ex, then cholesky_inverse), retried in float64 when a float32
factorisation fails. A factor wider than ``max_dim`` is inverted as block-diagonal: its diagonal blocks of at
most ``max_dim`` contiguous coordinates, off-diagonal blocks taken as 0 (Distributed Shampoo's blocking of large
preconditioners), so that one wide layer (a flattened conv map into a head) does not cost (d / max_dim)^2 times
the work of the blocks; the statistics form only those blocks (factors.accumulate_grams), kept in the whole
factor's tensor. A group whose factor holds NaN/Inf, or whose factorisation
fails in float64 too, keeps its previous pair of inverses (or, with none yet, the inverses of the damping terms
alone: the factors are treated as 0) and is reported: the result says which groups failed and an InverseWarning
is raised through ``warnings`` (turn it into an error with a warnings filter). No NaN ever leaves this module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kronograph.triton_kernels.dispatch import use_triton


class CurvatureWarning(RuntimeWarning):
    """Base of the warnings of the curvature state (turn them into errors with a warnings filter)."""


class InverseWarning(CurvatureWarning):
    """A damped factor could not be inverted; the previous inverse was kept."""


class StatisticsWarning(CurvatureWarning):
    """A mini-batch's factors were not finite and were not folded into the EMA."""


class CoverageWarning(CurvatureWarning):
    """K-FAC's curvature does not reach parameters it could: most of the model's lie outside every Kronecker block,
    or a layer's factor is too wide to keep (``max_kronecker_dim``)."""


class SkippedStepWarning(CurvatureWarning):
    """A batch whose loss or gradient was not finite was skipped; nothing of it reached the optimizer."""


class UntrustedModelWarning(CurvatureWarning):
    """K-FAC's quadratic model has predicted the loss badly from the start (rho far below 1/4 on most of the first
    steps): its curvature does not describe this model's loss, and the steps stay short (deep nets with batch
    norm in training mode, BENCHMARKS.md)."""


def factor_trace(m: torch.Tensor) -> torch.Tensor:
    """[groups] traces of factors [groups, d, d], or of diagonal ones kept as [groups, d]."""
    return m.sum(-1) if m.dim() == 2 else torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)


def trace_pi(a: torch.Tensor, g: torch.Tensor, a_trace: torch.Tensor | None = None) -> torch.Tensor:
    """pi = sqrt((tr A / dim A) / (tr G / dim G)) per group ([groups]; 1 where a trace is not positive/finite);
    ``a_trace``: tr A where the caller has it (a centred A~, ``centered_trace``)."""
    mean_a = (factor_trace(a) if a_trace is None else a_trace) / a.shape[-1]
    mean_g = factor_trace(g) / g.shape[-1]
    pi = torch.sqrt(mean_a / mean_g)
    usable = (mean_a > 0) & (mean_g > 0) & torch.isfinite(pi) & (pi > 0)
    return torch.where(usable, pi, torch.ones_like(pi))


def _try_inverse(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse, ok [groups]) of SPD matrices [groups, d, d]; failed groups hold garbage."""
    factor, info = torch.linalg.cholesky_ex(m)
    ok = info == 0
    # A failed factorisation leaves a zero pivot: failed groups get a unit diagonal, so potri cannot divide by zero
    # (always applied, no host read; their inverse is garbage and flagged). O(d), not a d x d select.
    diagonal = factor.diagonal(dim1=-2, dim2=-1)
    diagonal.copy_(torch.where(ok[:, None], diagonal, 1.0))
    # LAPACK's potri from the Cholesky factor: ~1.6x faster than a triangular solve against I and L^-T L^-1
    # for d ~ 1000 on CPU (torch 2.13, 2 threads).
    inverse = torch.cholesky_inverse(factor)
    ok = ok & finite_per_group(inverse)
    return inverse, ok


def cholesky_inverse(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse, ok [groups]) of SPD matrices [groups, d, d] by Cholesky, the failed groups tried again in float64
    when m is float32 or narrower; failed groups hold garbage."""
    inverse, ok = _try_inverse(m)
    retry = ~ok
    if m.dtype != torch.float64 and bool(retry.any()):
        again, ok64 = _try_inverse(m[retry].double())
        inverse[retry] = again.to(m.dtype)
        ok = ok.clone()
        ok[retry] = ok64 & finite_per_group(inverse[retry])
    return inverse, ok


def safe_damped(m: torch.Tensor, damping: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M + damping I with non-finite groups replaced by damping I, the damping per group clamped at 0 (0 where it
    was not finite), finite [groups]: whether the group's M and damping were finite)."""
    groups = m.shape[0]
    damping = torch.as_tensor(damping, dtype=m.dtype, device=m.device).expand(groups)
    finite = finite_per_group(m) & torch.isfinite(damping)
    damping = torch.where(torch.isfinite(damping), damping.clamp_min(0), torch.zeros_like(damping))
    safe = torch.where(finite[:, None, None], m, 0.0)  # a new tensor: the damping goes onto its diagonal in place
    safe.diagonal(dim1=-2, dim2=-1).add_(damping[:, None])
    return safe, damping, finite


def floored(m: torch.Tensor, damping: torch.Tensor | float, floor: float, share: float = 0.0,
            trace: torch.Tensor | None = None) -> torch.Tensor:
    """[groups] the damping of factors m, at least ``floor`` times m's mean eigenvalue tr(m) / dim and at least
    ``share`` times its trace (a group whose trace is not positive and finite keeps its damping). With gamma a
    thousandth of a factor's scale or less, its inverse amplifies directions the batch barely saw (steps that fit
    one batch and undo the others), and at the factor's float32 rounding its Cholesky fails (an output layer's G
    has an exact null vector). ``share``: KFAC's ``output_noise_damping``, (1 - s) / R of a softmax head's G.
    ``trace``: m's where the caller has it (a centred A~, ``centered_trace``)."""
    damping = torch.as_tensor(damping, dtype=m.dtype, device=m.device).expand(m.shape[0])
    if not floor and not share:
        return damping
    trace = factor_trace(m) if trace is None else trace
    bound = max(floor / m.shape[-1], share) * trace
    return torch.maximum(damping, torch.where(torch.isfinite(trace) & (trace > 0), bound, 0.0))


def damping_inverse(damping: torch.Tensor) -> torch.Tensor:
    """[groups] 1/damping (1 where damping is 0): the scale of the identity a failed group's inverse becomes."""
    tiny = torch.finfo(damping.dtype).tiny
    return torch.where(damping > 0, 1.0 / damping.clamp_min(tiny), torch.ones_like(damping))


def all_finite(tensors) -> bool:
    """Whether every entry of every tensor is finite: one sum per tensor (a NaN or Inf makes it non-finite;
    a finite tensor whose sum overflows is then scanned entry by entry). The sums are read by the host at
    once (one synchronisation on a GPU), each tensor apart only when one of them is not finite."""
    tensors = list(tensors)
    if not tensors:
        return True
    device = tensors[0].device
    sums = [x.sum() for x in tensors]  # float64 holds every real sum exactly; a complex one is read by its modulus
    sums = torch.stack([(s.abs() if s.is_complex() else s).double().to(device) for s in sums])
    if bool(torch.isfinite(sums).all()):
        return True
    for x in tensors:
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            return False
    return True


def finite_per_group(x: torch.Tensor) -> torch.Tensor:
    """[groups] bool: all entries finite (on the device: no host read). By the largest and smallest entry (max and
    min propagate NaN; an Inf is one of them): two reductions without a d x d temporary, ~8x faster than
    isfinite(x).all() at d = 785 on CPU (torch 2.13), where it was a tenth of an inversion's time."""
    dims = (-2, -1)
    return torch.isfinite(x.amax(dim=dims)) & torch.isfinite(x.amin(dim=dims))


def _newton_schulz(m: torch.Tensor) -> bool:
    """Whether ``damped_inverse`` takes the Triton kernel's Newton-Schulz iteration (float32 on CUDA), the one
    path that reads a previous inverse as its warm start."""
    return m.dtype == torch.float32 and use_triton("auto", m, "inverse")


def damped_inverse(m: torch.Tensor, damping: torch.Tensor | float, previous: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M + damping I)^-1 per group, NaN-safe: returns (inverse in M's dtype, failed [groups] bool).

    Failed groups hold the inverse of the damping term alone, 1/damping I (I when damping is 0). On CUDA
    (float32 factors) by the Triton kernel's Newton-Schulz iteration warm-started from ``previous`` (the
    inverse in use: factors move slowly), with its residual check and this Cholesky as fallback
    (``triton_kernels.inverse``); elsewhere by Cholesky, ``previous`` unused.

    Args:
        m: symmetric PSD factors [groups, d, d].
        damping: a scalar or one value per group (added to the diagonal).
        previous: [groups, d, d] the last inverse of these factors, or None.
    """
    if _newton_schulz(m):
        from kronograph.triton_kernels.inverse import damped_inverse_ns  # imports triton: only here

        usable = previous is not None and previous.shape == m.shape and previous.dtype == m.dtype
        return damped_inverse_ns(m, damping, previous if usable else None, backend="triton")
    damped, damping, finite = safe_damped(m, damping)
    inverse, ok = _try_inverse(damped)
    ok = ok & finite
    if bool(ok.all()):  # the one host read of an inversion when every group succeeds
        return inverse, ~ok
    retry = finite & ~ok
    if m.dtype != torch.float64 and bool(retry.any()):  # a float32 factorisation failed: float64
        again, ok64 = _try_inverse(damped[retry].double())
        inverse[retry] = again.to(m.dtype)
        ok = ok.clone()
        ok[retry] = ok64 & finite_per_group(inverse[retry])
    # failed groups become damping_inverse * I in place (ok groups untouched)
    inverse.masked_fill_(~ok[:, None, None], 0.0)
    inverse.diagonal(dim1=-2, dim2=-1).add_(torch.where(ok, 0.0, damping_inverse(damping))[:, None])
    return inverse, ~ok


def diagonal_damped_inverse(m: torch.Tensor, damping: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """``damped_inverse`` of diagonal factors kept as [groups, d]: 1 / (m + damping), NaN-safe alike (a group whose
    diagonal or damping is not finite, or whose damped diagonal is not positive, gets 1 / damping)."""
    damping = torch.as_tensor(damping, dtype=m.dtype, device=m.device).expand(m.shape[0])
    finite = torch.isfinite(m).all(-1) & torch.isfinite(damping)
    damping = torch.where(torch.isfinite(damping), damping.clamp_min(0), torch.zeros_like(damping))
    damped = m + damping[:, None]
    ok = finite & (damped > 0).all(-1)
    inverse = torch.where(ok[:, None], 1.0 / torch.where(ok[:, None], damped, 1.0), damping_inverse(damping)[:, None])
    return inverse, ~ok


def diagonal_block_sizes(d: int, max_dim: int | None) -> list[int]:
    """Widths of the contiguous diagonal blocks a d-wide factor is inverted in: [d] up to ``max_dim`` (None: no
    bound), else ceil(d / max_dim) blocks, all of one width but the last, which may be narrower."""
    if not max_dim or d <= max_dim:
        return [d]
    width = math.ceil(d / math.ceil(d / max_dim))
    return [width] * (d // width) + ([d % width] if d % width else [])


def block_diagonal_inverse(m: torch.Tensor, damping: torch.Tensor | float, previous: torch.Tensor | None = None,
                           max_dim: int | None = None, sizes: Sequence[int] | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B + damping I)^-1 with B the block-diagonal part of M in ``diagonal_block_sizes``' blocks (or the widths
    ``sizes``, the first the widest), NaN-safe as ``damped_inverse`` (the result, [groups, d, d], is 0 off the
    blocks; a group fails when one of its blocks does). The blocks, narrower ones padded with an identity, are
    inverted in one batched call."""
    if m.dim() == 2:  # a table's diagonal A
        return diagonal_damped_inverse(m, damping)
    sizes = list(sizes) if sizes is not None else diagonal_block_sizes(m.shape[-1], max_dim)
    if len(sizes) == 1:
        return damped_inverse(m, damping, previous)
    usable = (previous is not None and previous.shape == m.shape and previous.dtype == m.dtype
              and _newton_schulz(m))  # the blocks of the previous inverse are formed only where they are read
    inverses, failed = _block_inverses(m, damping, sizes, previous if usable else None)
    inverse = m.new_zeros(m.shape)
    _place_blocks(inverse, inverses, sizes)
    return inverse, failed


def _stacked_blocks(x: torch.Tensor, sizes: Sequence[int], outer: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> torch.Tensor:
    """x's diagonal blocks of ``sizes`` as [groups * count, width, width], narrower ones padded with an identity;
    ``outer`` (s, v): the blocks of x - s v v^T, formed block by block (a centred factor never formed whole)."""
    groups, count, width = x.shape[0], len(sizes), sizes[0]
    out = x.new_zeros(groups, count, width, width)
    for i, (start, size) in enumerate(zip(_starts(sizes), sizes)):
        part = slice(start, start + size)
        out[:, i, :size, :size] = x[:, part, part]
        if outer is not None:
            v = outer[1][:, part]
            out[:, i, :size, :size] -= outer[0][:, None, None] * v[:, :, None] * v[:, None, :]
        out[:, i, size:, size:].diagonal(dim1=-2, dim2=-1).fill_(1.0)  # the padding: an identity
    return out.reshape(groups * count, width, width)


def _block_inverses(m: torch.Tensor, damping: torch.Tensor | float, sizes: Sequence[int],
                    previous: torch.Tensor | None = None, outer: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """([groups, count, width, width] the damped inverses of m's (or m - s v v^T's, ``outer``) diagonal blocks of
    ``sizes``, failed [groups]) by one batched ``damped_inverse``."""
    groups, count, width = m.shape[0], len(sizes), sizes[0]
    damping = torch.as_tensor(damping, dtype=m.dtype, device=m.device).expand(groups)
    inverses, failed = damped_inverse(_stacked_blocks(m, sizes, outer), damping.repeat_interleave(count),
                                      None if previous is None else _stacked_blocks(previous, sizes))
    return inverses.reshape(groups, count, width, width), failed.reshape(groups, count).any(dim=1)


def _place_blocks(out: torch.Tensor, inverses: torch.Tensor, sizes: Sequence[int]) -> None:
    """Writes ``_block_inverses``' blocks onto out's diagonal (out: zeros, or a view of them)."""
    for i, (start, size) in enumerate(zip(_starts(sizes), sizes)):
        out[:, start:start + size, start:start + size] = inverses[:, i, :size, :size]


def _starts(widths: Sequence[int]) -> list[int]:
    """Where each of the contiguous blocks of ``widths`` starts."""
    return [sum(widths[:i]) for i in range(len(widths))]


@dataclass
class DampedInverses:
    """The damped inverses of one block, the pi used, and which groups kept their previous inverse.

    ``a_blocks`` / ``g_blocks``: where a side was inverted block-diagonally, the widths of its diagonal blocks (the
    coordinates past their sum, a centred A's homogeneous one, couple to all: a dense border); its products then
    read the blocks alone (``times_a_inv``, ``g_inv_times``: a 3137-wide head's A in four blocks is a quarter of the
    reads). None: the side is multiplied as a dense matrix (always right, the only form a restored or received
    inverse has)."""

    a_inv: torch.Tensor
    g_inv: torch.Tensor
    pi: torch.Tensor
    failed: torch.Tensor  # [groups] bool: A or G of the group was not inverted this time
    a_blocks: tuple[int, ...] | None = None
    g_blocks: tuple[int, ...] | None = None

    @property
    def ok(self) -> bool:
        return not bool(self.failed.any())

    def times_a_inv(self, x: torch.Tensor) -> torch.Tensor:
        """x A_inv for x [groups, r, d_A] (a diagonal A_inv scales x's columns)."""
        if self.a_inv.dim() == 2:
            return x * self.a_inv[:, None, :]
        return x @ self.a_inv if self.a_blocks is None else times_blocks(x, self.a_inv, self.a_blocks)

    def g_inv_times(self, x: torch.Tensor) -> torch.Tensor:
        """G_inv x for x [groups, d_G, c] (a diagonal G_inv scales x's rows); G_inv is symmetric."""
        if self.g_inv.dim() == 2:
            return self.g_inv[:, :, None] * x
        if self.g_blocks is None:
            return self.g_inv @ x
        return times_blocks(x.transpose(1, 2), self.g_inv, self.g_blocks).transpose(1, 2)


def times_blocks(x: torch.Tensor, inverse: torch.Tensor, widths: tuple[int, ...]) -> torch.Tensor:
    """x @ inverse for an inverse [groups, d, d] that is 0 off its diagonal blocks of ``widths`` but for a dense
    border of the last d - sum(widths) rows and columns; the same product as the dense one, the zeros unread."""
    inner = sum(widths)
    head = torch.cat([x[..., a:a + w] @ inverse[:, a:a + w, a:a + w] for a, w in zip(_starts(widths), widths)],
                     dim=-1)
    if inner == inverse.shape[-1]:
        return head
    head = head + x[..., inner:] @ inverse[:, inner:, :inner]
    return torch.cat([head, x @ inverse[:, :, inner:]], dim=-1)


def inverse_blocks(d: int, max_dim: int | None, border: bool = False) -> tuple[int, ...] | None:
    """The diagonal blocks' widths of a d-wide factor's damped inverse when ``block_diagonal_inverse`` splits it
    (``border``: a centred A, whose covariance block is the first d - 1 coordinates); None when it is whole."""
    widths = diagonal_block_sizes(d - border, max_dim)
    return tuple(widths) if len(widths) > 1 else None


def input_mean(a: torch.Tensor) -> torch.Tensor | None:
    """mu = E[x] per group from a factor [groups, d, d] of inputs [x; 1]: A's last column over its last entry s;
    None when s is not positive and finite (no usable statistics).

    With T = [[I, mu], [0, 1]], which maps centred inputs [x - mu; 1] to [x; 1], the factor in centred coordinates
    is A~ = T^-1 A T^-T = [[A_11 - s mu mu^T, 0], [0, s]]: the covariance of the inputs and the homogeneous entry.
    It is never formed whole (a 3137-wide head's would be five passes over 39 MB a refresh): ``centered_trace``
    and ``centered_damped_inverse`` read what they need of it."""
    s = a[:, -1, -1]
    if not bool((torch.isfinite(s) & (s > 0)).all()):
        return None
    return a[:, :-1, -1] / s[:, None]


def centered_trace(a: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """[groups] tr A~ = tr A - s |mu|^2 (``input_mean``'s A~)."""
    return factor_trace(a) - a[:, -1, -1] * (mu * mu).sum(-1)


def centered_damped_inverse(a: torch.Tensor, mu: torch.Tensor, damping: torch.Tensor | float,
                            max_dim: int | None = None, sizes: Sequence[int] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A + damping T T^T)^-1 = T^-T (A~ + damping I)^-1 T^-1 from the factor A and ``input_mean``'s mu.

    Tikhonov damping of the centred coordinates: the identity in the coordinates where the inputs have
    zero mean, so damping does not undo K-FAC's invariance to a shift of the inputs (paper sec 10). A~ is
    block diagonal, so only its covariance block A_11 - s mu mu^T is inverted; the map back costs O(d^2).
    Returns the inverse and the failed groups, as ``damped_inverse``; a covariance block wider than ``max_dim``
    is inverted block-diagonally (as ``block_diagonal_inverse``; ``sizes``: its blocks' widths where the caller
    has them), its blocks formed one by one.
    """
    groups, d = a.shape[0], a.shape[-1]
    s = a[:, -1, -1]
    damping = torch.as_tensor(damping, dtype=a.dtype, device=a.device).expand(groups)
    sizes = list(sizes) if sizes is not None else diagonal_block_sizes(d - 1, max_dim)
    inverse = a.new_zeros(groups, d, d)
    inner = inverse[:, :-1, :-1]
    if len(sizes) == 1:
        covariance = a[:, :-1, :-1] - s[:, None, None] * mu[:, :, None] * mu[:, None, :]
        whole, failed = damped_inverse(covariance, damping)
        inner.copy_(whole)
        shifted = whole @ mu[:, :, None]  # X_11 mu
    else:
        inverses, failed = _block_inverses(a[:, :-1, :-1], damping, sizes, outer=(s, mu))
        _place_blocks(inner, inverses, sizes)
        shifted = torch.cat([inner[:, i:i + w, i:i + w] @ mu[:, i:i + w, None]
                             for i, w in zip(_starts(sizes), sizes)], dim=1)
    corner = 1.0 / (s + damping)
    inverse[:, :-1, -1:] = -shifted
    inverse[:, -1:, :-1] = -shifted.transpose(1, 2)
    inverse[:, -1, -1] = (mu[:, None, :] @ shifted)[:, 0, 0] + corner
    return inverse, failed


def factor_dampings(a: torch.Tensor, g: torch.Tensor, gamma: float, centered: bool = False, floor: float = 0.0,
                    g_share: float = 0.0) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sec 6.3's factored Tikhonov damping of one block, per group: (``input_mean``'s mu where A is damped in
    centred coordinates, None where as it is; pi; A's damping pi gamma; G's damping gamma / pi), pi from the
    centred factor's trace where centred and both dampings ``floored`` (G's also by ``g_share``). See
    ``factored_inverses``."""
    mu = input_mean(a) if centered else None
    trace = None if mu is None else centered_trace(a, mu)
    pi = trace_pi(a, g, trace)
    return mu, pi, floored(a, pi * gamma, floor, trace=trace), floored(g, gamma / pi, floor, g_share)


def factored_inverses(
    a: torch.Tensor,
    g: torch.Tensor,
    gamma: float,
    previous: DampedInverses | None = None,
    name: str = "",
    centered: bool = False,
    knob: str = "factor_damping",
    floor: float = 0.0,
    max_dim: int | None = None,
    g_share: float = 0.0,
) -> DampedInverses:
    """(A + pi gamma I)^-1 and (G + (gamma/pi) I)^-1 per group, warning (InverseWarning) on any failure.

    ``centered`` (a layer with a bias, whose inputs end in the homogeneous 1): A is damped in coordinates
    centred on the mean input, (A + pi gamma T T^T)^-1 (``centered_damped_inverse``), with pi from the
    centred factor's trace, so that inputs far from zero mean (sigmoid units near 1/2) do not hide their
    variation under a damping sized by their mean. ``knob`` is the caller's name for gamma, which a failure's
    warning tells the user to raise (KFAC's ``factor_damping``, KFACPreconditioner's ``damping``). ``floor``:
    each factor's damping is at least this fraction of its mean eigenvalue (``floored``). ``max_dim``: a factor
    wider than this is inverted block-diagonally (``block_diagonal_inverse``; pi from its whole trace, which is
    the blocks' trace). ``g_share``: G's damping is also at least this fraction of its trace (``floored``).
    """
    mu, pi, a_damping, g_damping = factor_dampings(a, g, gamma, centered, floor, g_share)
    # the partition asked for, the one a block's statistics form (curvature.BlockDiagonalCurvature), whether or not
    # centring succeeds: were it to fail, the uncentred A is inverted in the same blocks, its corner one more
    a_blocks = None if a.dim() == 2 else inverse_blocks(a.shape[-1], max_dim, border=centered)
    g_blocks = None if g.dim() == 2 else inverse_blocks(g.shape[-1], max_dim)
    if mu is not None:
        a_inv, a_failed = centered_damped_inverse(a, mu, a_damping, max_dim, a_blocks)
    else:
        if centered and a_blocks is not None:
            a_blocks = (*a_blocks, 1)
        a_inv, a_failed = block_diagonal_inverse(a, a_damping, None if previous is None else previous.a_inv, max_dim,
                                                 a_blocks)
    g_inv, g_failed = block_diagonal_inverse(g, g_damping, None if previous is None else previous.g_inv, max_dim,
                                             g_blocks)
    failed = a_failed | g_failed
    if bool(failed.any()):
        if previous is not None:  # a group keeps its previous pair (and pi) as a whole
            # (a previous A damped uncentred has no border: the sides whose structure differs are dense)
            a_blocks = a_blocks if previous.a_blocks == a_blocks else None
            g_blocks = g_blocks if previous.g_blocks == g_blocks else None
            a_inv = torch.where(failed.view(-1, *[1] * (a_inv.dim() - 1)), previous.a_inv.to(a_inv.dtype), a_inv)
            g_inv = torch.where(failed.view(-1, *[1] * (g_inv.dim() - 1)), previous.g_inv.to(g_inv.dtype), g_inv)
            pi = torch.where(failed, previous.pi.to(pi.dtype), pi)
        which = [i for i, bad in enumerate(failed.tolist()) if bad]
        warnings.warn(
            f"K-FAC block {name or '?'}: the damped factors of group(s) {which} are not finite or not positive "
            f"definite; kept the previous inverse (raise {knob} if this repeats)",
            InverseWarning,
            stacklevel=2,
        )
    return DampedInverses(a_inv, g_inv, pi, failed, a_blocks, g_blocks)


def precondition(grad_bar: torch.Tensor, inverses: DampedInverses) -> torch.Tensor:
    """U = G_inv grad_W_bar A_inv per group: the damped Kronecker solve (without the minus sign); a table's
    diagonal A_inv scales grad_W_bar's columns, a wide head's diagonal G_inv its rows."""
    return inverses.times_a_inv(inverses.g_inv_times(grad_bar.to(inverses.a_inv.dtype)))
