"""The quadratic model M(delta) with the exact Fisher of the mini-batch (paper 6.4, 7 and appendix C).

M(delta) = 1/2 delta^T (F + (lambda + eta) I) delta + grad^T delta. Only scalars d_a^T F d_b are needed:
F = mean_i J_i^T H_i J_i, so each direction costs one forward-mode pass (J_i d by ``torch.func.jvp``), or
plain forwards by differences (``difference_products``): two by central differences (the onnxruntime engine's
way, and the torch engine's with ``fisher_products="differences"``) or one beside a shared forward at theta
(``"one-sided"``, which keeps the fused attention kernels that forward mode cannot use), and the products
come from the loss's output curvature H_i. F itself is never formed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from kronograph.runtime.losses import Loss
from kronograph.runtime.spectral_norm import held_power_iterations

Direction = Mapping[str, torch.Tensor]  # parameter name -> a tensor shaped like the parameter

#: the largest relative change of a parameter tensor in a central-difference step (see difference_step).
DIFFERENCE_STEP = 3e-4
#: The outputs' relative change |s(theta + h d) - s(theta)| / |s(theta)| beyond which a difference's h is shrunk
#: (to LINEAR_OUTPUT_CHANGE, at most MAX_SHRINKS times): on the first-try suite's models it is 7e-5-8e-4 at the step
#: DIFFERENCE_STEP gives; on a 24-layer batch-norm MLP 0.3, where that h gave J d 12x short (BENCHMARKS.md).
NONLINEAR_OUTPUT_CHANGE, LINEAR_OUTPUT_CHANGE, MAX_SHRINKS = 1e-2, 1e-3, 2
#: The change is measured on the outputs' first this many entries (the first examples' rows): a bend along d shows in
#: any example's outputs, and a 2048-word LM's 2M logits cost ~4 ms a step to reduce whole (BENCHMARKS.md).
PROBED_OUTPUTS = 1 << 16


def output_tangents(
    module: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: Sequence[torch.Tensor],
    directions: Sequence[Direction],
    select: Callable[[Any], torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The outputs s on ``inputs`` and J d for every direction d, by forward-mode differentiation.

    Parameters missing from a direction count as zero. Buffers (batch-norm running statistics) are
    copied inside each pass so that these extra forwards leave the module's state untouched; spectral norms run no
    power iteration (as in the torch engine's other extra forwards, ``TorchEngine._extra_forward``), which forward
    mode could not pass anyway (its normalisations write out=).
    """
    names = list(params)
    primals = tuple(params[name].detach() for name in names)
    buffers = dict(module.named_buffers())

    def forward(*values: torch.Tensor) -> torch.Tensor:
        # Copies made inside the transformed function: batch norm may update them in place.
        copies = {name: buffer.clone() for name, buffer in buffers.items()}
        outputs = functional_call(module, {**copies, **dict(zip(names, values))}, tuple(inputs))
        return outputs if select is None else select(outputs)

    if not directions:
        return None, []
    # All directions in one vmapped forward-mode pass: the primal forward is shared by the directions.
    stacked = tuple(
        torch.stack([d.get(name, torch.zeros_like(value)).to(value.dtype) for d in directions])
        for name, value in zip(names, primals)
    )
    # The fused attention kernels have no forward-mode derivative on CPU; the math one is made of
    # differentiable ops (same values up to rounding). A model with dropout draws one mask for all the
    # directions (randomness="same"): the products are those of one random forward, as the gradient's.
    with sdpa_kernel(SDPBackend.MATH), held_power_iterations(module):
        outputs, output_tangents = vmap(lambda *tangent: jvp(forward, primals, tangent), randomness="same")(*stacked)
    return outputs[0].detach(), list(output_tangents.detach().unbind(0))


def difference_products(
    forward_at: Callable[[Direction | None, float], torch.Tensor], theta: Mapping[str, torch.Tensor],
    directions: Sequence[Direction], scheme: str = "central", outputs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The outputs s and J d for every direction by differences of plain forwards, in the outputs' dtype.

    ``forward_at(direction, h)`` returns the outputs at theta + h direction (direction None: at theta), a tensor of
    its own (the differences are taken in it: no second output-sized tensor, 5% of a 2048-word LM's step), and
    leaves theta as it was.
    ``scheme``: "central", (s(theta + h d) - s(theta - h d)) / 2h, error O(h^2), two forwards a direction; or
    "one-sided", (s(theta + h d) - s(theta)) / h, error O(h), one forward a direction beside the shared s(theta)
    (``outputs``, when the caller has it already at these weights and inputs). h keeps every tensor's relative
    change at DIFFERENCE_STEP (``difference_step``): the quadratic model's Gram entries are then within ~1e-4
    of forward mode's (1e-2 at worst) one-sided, below 1e-3 central, on the first-try suite's models. Where the
    outputs change by more than NONLINEAR_OUTPUT_CHANGE of their norm within h they bend there (a deep net with
    batch norm in training mode): h is shrunk until they change by LINEAR_OUTPUT_CHANGE (one more forward or two)."""
    outputs = forward_at(None, 0.0) if outputs is None else outputs
    sizes = parameter_sizes(theta)
    scale = float(torch.linalg.vector_norm(_probed(outputs)))
    tangents = []
    # A difference of two float32 outputs is exact in float32 where they are within 2x of each other (Sterbenz)
    # and rounded once otherwise; the quotient rounds once more (6e-8), far below the differences' own O(h^2).
    for direction in directions:
        h = difference_step(direction, sizes)
        if h is None:
            tangents.append(torch.zeros_like(outputs))
            continue
        one_sided = scheme == "one-sided"
        for shrinks in range(MAX_SHRINKS + 1):
            if one_sided:
                difference = forward_at(direction, h).sub_(outputs)
            else:
                difference = forward_at(direction, h).sub_(forward_at(direction, -h))
            norm = float(torch.linalg.vector_norm(_probed(difference)))
            change = norm / (scale if one_sided else 2 * scale) if scale > 0 else 0.0
            if shrinks == MAX_SHRINKS or not NONLINEAR_OUTPUT_CHANGE < change < math.inf:
                break
            h *= LINEAR_OUTPUT_CHANGE / change  # the outputs bend within this h: a shorter one, linear again
        tangents.append(difference.div_(h if one_sided else 2 * h))
    return outputs, tangents


def _probed(outputs: torch.Tensor) -> torch.Tensor:
    """The outputs' first PROBED_OUTPUTS entries, where difference_products measures their change."""
    return outputs.reshape(-1)[:PROBED_OUTPUTS]


def parameter_sizes(theta: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each tensor's size for the difference step: its norm, or its share of |theta| when larger (an all-zero
    bias), or 1 when theta is all zero. A function of the current weights only: a resumed run takes the
    same steps as an uninterrupted one."""
    norms = dict(zip(theta, _norms(theta.values())))
    total = sum(t.numel() for t in theta.values())
    whole = math.sqrt(sum(n * n for n in norms.values()))
    return {name: max(norms[name], (t.numel() / total) ** 0.5 * whole) or 1.0 for name, t in theta.items()}


def _norms(tensors: Iterable[torch.Tensor]) -> list[float]:
    """Each tensor's 2-norm, accumulated in float64, read by the host at once (one synchronisation on a GPU)."""
    norms = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]
    return torch.stack([n.to(norms[0].device) for n in norms]).tolist() if norms else []


def difference_step(direction: Direction, sizes: Mapping[str, float]) -> float | None:
    """h such that no parameter tensor moves by more than DIFFERENCE_STEP of its size; None for d = 0.

    Relative to each tensor, not to the whole theta: K-FAC's updates are concentrated on a few small
    tensors, and a step scaled to |theta| moves those far out of the linear range (33% error measured on
    the paper's autoencoder, against 1.5e-4 this way)."""
    largest = max((norm / sizes[name] for name, norm in zip(direction, _norms(direction.values()))), default=0.0)
    if largest == 0 or not math.isfinite(largest):
        return None
    return DIFFERENCE_STEP / largest


def curvature_gram(loss: Loss, outputs: torch.Tensor, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
    """[k, k] matrix of (J d_a)^T H (J d_b) averaged over the examples (float64): d_a^T F d_b."""
    return curvature_gram_sum(loss, outputs, tangents) / outputs.shape[0]


def curvature_gram_sum(loss: Loss, outputs: torch.Tensor, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
    """``curvature_gram`` summed over the examples instead of averaged: data-parallel ranks add up their
    examples' sums (one all_reduce) and divide by the sub-batch's size."""
    if not tangents:
        return torch.zeros(0, 0, dtype=torch.float64, device=outputs.device)
    return loss.curvature_gram_sum(outputs, tangents)


def fisher_gram(
    module: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: Sequence[torch.Tensor],
    loss: Loss,
    directions: Sequence[Direction],
) -> torch.Tensor:
    """[k, k] matrix of d_a^T F d_b for the k directions, F the exact Fisher on ``inputs`` (float64)."""
    outputs, tangents = output_tangents(module, params, inputs, directions)
    if outputs is None:
        return torch.zeros(0, 0, dtype=torch.float64, device=inputs[0].device)
    return curvature_gram(loss, outputs, tangents)


def inner(x: Direction, y: Direction) -> float:
    """sum over shared parameters of <x_p, y_p> (each dot product in the tensors' dtype, summed in float64)."""
    return float(inner_tensor(x, y))


def inner_tensor(x: Direction, y: Direction) -> torch.Tensor:
    """``inner`` as a float64 0-dim tensor on the directions' device, without a host synchronisation. The dot
    products are added one by one in float64, as Python's sum of floats did: the same value, bit for bit."""
    total = None
    for name in x:
        if name in y:
            dot = torch.vdot(x[name].reshape(-1), y[name].reshape(-1)).double()
            total = dot if total is None else total + dot
    if total is None:
        device = next((t.device for t in (*x.values(), *y.values())), torch.device("cpu"))
        return torch.zeros((), dtype=torch.float64, device=device)
    return total


@dataclass(frozen=True)
class QuadraticSolution:
    """Coefficients c minimising M(sum_a c_a d_a), and the model's decrease M(delta) - M(0) there."""

    coefficients: tuple[float, ...]
    decrease: float


def solve_quadratic_model(gram_f: torch.Tensor, gram_i: torch.Tensor, gradient: torch.Tensor, damping: float,
                          bounds: Sequence[tuple[float, float]] | None = None,
                          max_condition: float | None = None,
                          max_decrease: float | None = None) -> QuadraticSolution:
    """Minimise 1/2 c^T (gram_f + damping gram_i) c + gradient^T c over c (paper sec 7's 2x2 system).

    ``gram_f`` holds d_a^T F d_b, ``gram_i`` d_a^T d_b and ``gradient`` grad^T d_a; damping = lambda + eta.
    Directions that are zero or make the system singular (the first step has no previous update) are
    dropped, so the result is the best combination of the others. At the optimum M - M(0) = 1/2 grad^T c.

    Bounds (the default preset's; the paper's algorithm has none): ``bounds[a] = (low, high)`` keeps
    low <= c_a <= high (each may be infinite, 0 lies inside), so a descent direction is never taken uphill and
    the previous update's coefficient stays in a set range (K-FAC's ``max_momentum``); and a system whose
    matrix, scaled to a unit diagonal, has a condition number above ``max_condition`` is treated as singular
    (nearly parallel directions give coefficients of opposite sign and huge size that fit the sub-batch's
    noise). The bounded
    minimiser is exact: each coefficient is free or at one of its bounds, every such choice is solved (k <= 3
    here: at most 27; 0 is always a choice) and the feasible one with the lowest model value is kept.

    ``max_decrease``: where the minimiser's decrease is larger, its coefficients are shortened (one factor t < 1 for
    all) to the point of the segment from 0 whose decrease is exactly this (``shortened``).
    """
    gram_f, gram_i, gradient = (t.double().numpy() for t in _on_host(gram_f, gram_i, gradient))
    matrix = gram_f + damping * gram_i
    solution = _minimise(matrix, gram_i, gradient, bounds, max_condition)
    if max_decrease is not None and -solution.decrease > max_decrease:
        return shortened(solution, matrix, gradient, max_decrease)
    return solution


def shortened(solution: QuadraticSolution, matrix: np.ndarray, gradient: np.ndarray, decrease: float
              ) -> QuadraticSolution:
    """t c for the first t in (0, 1] at which the model's decrease reaches ``decrease`` (below the minimiser's):
    M(t c) - M(0) = q t^2 + l t with q = c^T matrix c / 2 and l = grad^T c < 0 falls from 0 to its least value
    M(c) - M(0) monotonically up to t = 1, so t is the smaller root of q t^2 + l t + decrease = 0. A box of bounds
    that holds 0 and c holds t c."""
    c = np.asarray(solution.coefficients)
    q, l = _along(c, matrix, gradient)
    if q > 0:
        t = (-l - math.sqrt(max(l * l - 4 * q * decrease, 0.0))) / (2 * q)
    else:
        t = decrease / -l
    return QuadraticSolution(tuple((t * c).tolist()), -decrease)


def scaled(solution: QuadraticSolution, t: float, gram_f: torch.Tensor, gram_i: torch.Tensor,
           gradient: torch.Tensor, damping: float) -> QuadraticSolution:
    """t c and the model's decrease there, M(t c) - M(0) = q t^2 + l t with the matrix gram_f + damping gram_i
    (``_along``; for t in (0, 1], below the minimiser's: a box of bounds that holds 0 and c holds t c)."""
    gram_f, gram_i, gradient = (x.double().numpy() for x in _on_host(gram_f, gram_i, gradient))
    c = np.asarray(solution.coefficients)
    q, l = _along(c, gram_f + damping * gram_i, gradient)
    return QuadraticSolution(tuple((t * c).tolist()), q * t * t + l * t)


def _along(c: np.ndarray, matrix: np.ndarray, gradient: np.ndarray) -> tuple[float, float]:
    """(q, l) of the model along c: M(t c) - M(0) = q t^2 + l t, q = c^T matrix c / 2, l = grad^T c."""
    return 0.5 * float(c @ matrix @ c), float(gradient @ c)


def _minimise(matrix: np.ndarray, gram_i: np.ndarray, gradient: np.ndarray,
              bounds: Sequence[tuple[float, float]] | None, max_condition: float | None) -> QuadraticSolution:
    """``solve_quadratic_model``'s minimiser of 1/2 c^T matrix c + gradient^T c, before any shortening."""
    # A k <= 3 system solved branch by branch: numpy's LAPACK calls cost microseconds where torch's small-op
    # dispatch cost ~0.7 ms a branch (5 ms a step on the MNIST classifier).
    keep = [a for a in range(len(gradient)) if gram_i[a, a] > 0 and np.isfinite(matrix[a]).all()]
    if bounds is None and max_condition is None:
        while keep:  # the paper's rule: drop the last direction until the system is solvable
            if _solvable(matrix, keep):
                return _solve_on(matrix, gradient, keep)
            keep = keep[:-1]
        return QuadraticSolution(tuple(0.0 for _ in range(len(gradient))), 0.0)
    limits = list(bounds) if bounds is not None else [(-math.inf, math.inf)] * len(gradient)
    best = QuadraticSolution(tuple(0.0 for _ in range(len(gradient))), 0.0)
    states = [[None, 0.0] + [value for value in limits[a] if math.isfinite(value) and value != 0] for a in keep]
    inverses: dict[tuple[int, ...], np.ndarray | None] = {}  # the branches share at most 2^k systems
    for choice in itertools.product(*states):
        free = tuple(a for a, state in zip(keep, choice) if state is None)
        fixed = {a: state for a, state in zip(keep, choice) if state}  # those at 0 are left out
        if free not in inverses:  # None: not solvable (or no free direction)
            inverses[free] = (np.linalg.inv(matrix[np.ix_(free, free)])
                              if free and _solvable(matrix, list(free), max_condition) else None)
        if free and inverses[free] is None:
            continue
        solution = _solve_on(matrix, gradient, list(free), fixed, inverses[free])
        if solution.decrease >= best.decrease:
            continue
        if all(low <= c <= high for c, (low, high) in zip(solution.coefficients, limits)):
            best = solution
    return best


def _on_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The quadratic model's small matrices, built on the model's device, copied to the host in one transfer (the
    step's one synchronisation for the model): its k <= 3 system is solved there, branch by branch."""
    if all(t.device.type == "cpu" for t in tensors):
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]).cpu()
    return [part.reshape(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _solvable(matrix: np.ndarray, keep: list[int], max_condition: float | None = None) -> bool:
    """Whether the system of the directions ``keep`` is nonsingular (numpy's matrix_rank criterion: its singular
    values, the eigenvalues' moduli here, above k eps times the largest), positive definite and, scaled to a unit
    diagonal, no worse conditioned than ``max_condition``."""
    sub = matrix[np.ix_(keep, keep)]
    moduli = np.abs(np.linalg.eigvalsh(sub))
    if moduli.min() <= moduli.max() * len(keep) * np.finfo(sub.dtype).eps:
        return False
    scale = 1 / np.sqrt(np.maximum(sub.diagonal(), np.finfo(sub.dtype).tiny))
    eigenvalues = np.linalg.eigvalsh(sub * scale[:, None] * scale[None, :])
    if eigenvalues.min() <= 0:
        return False
    return max_condition is None or eigenvalues.max() / eigenvalues.min() <= max_condition


def _solve_on(matrix: np.ndarray, gradient: np.ndarray, keep: list[int], fixed: Mapping[int, float] | None = None,
              inverse: np.ndarray | None = None) -> QuadraticSolution:
    """The minimiser over the directions ``keep`` (a ``_solvable`` system, whose inverse may be given: the bounded
    branches share it) with those in ``fixed`` at their values and the others at 0."""
    coefficients = np.zeros(len(gradient))
    for a, value in (fixed or {}).items():
        coefficients[a] = value
    if keep:
        rhs = gradient[keep] + matrix[keep] @ coefficients
        solved = -(inverse @ rhs if inverse is not None else np.linalg.solve(matrix[np.ix_(keep, keep)], rhs))
        coefficients[keep] = solved
        if not fixed:  # M - M(0) = 1/2 grad^T c at the unconstrained optimum (the paper's rule)
            return QuadraticSolution(tuple(coefficients.tolist()), 0.5 * float(gradient[keep] @ solved))
    decrease = 0.5 * coefficients @ matrix @ coefficients + gradient @ coefficients
    return QuadraticSolution(tuple(coefficients.tolist()), float(decrease))
