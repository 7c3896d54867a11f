"""The quadratic model M(delta) with the exact Fisher of the mini-batch (paper 6.4, 7 and appendix C).

M(delta) = 1/2 delta^T (F + (lambda + eta) I) delta + grad^T delta. Only scalars d_a^T F d_b are needed:
F = mean_i J_i^T H_i J_i, so each direction costs one forward-mode pass (J_i d by ``torch.func.jvp``) and
the products come from the loss's output curvature H_i. F itself is never formed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from kronograph.runtime.losses import Loss

Direction = Mapping[str, torch.Tensor]  # parameter name -> a tensor shaped like the parameter


def output_tangents(
    module: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    inputs: Sequence[torch.Tensor],
    directions: Sequence[Direction],
    select: Callable[[Any], torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The outputs s on ``inputs`` and J d for every direction d, by forward-mode differentiation.

    Parameters missing from a direction count as zero. Buffers (batch-norm running statistics) are
    copied inside each pass so that these extra forwards leave the module's state untouched.
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
    with sdpa_kernel(SDPBackend.MATH):
        outputs, output_tangents = vmap(lambda *tangent: jvp(forward, primals, tangent), randomness="same")(*stacked)
    return outputs[0].detach(), list(output_tangents.detach().unbind(0))


def curvature_gram(loss: Loss, outputs: torch.Tensor, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
    """[k, k] matrix of (J d_a)^T H (J d_b) averaged over the examples (float64): d_a^T F d_b."""
    k = len(tangents)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for a in range(k):
        for b in range(a, k):
            gram[a, b] = gram[b, a] = loss.curvature(outputs, tangents[a], tangents[b]).double().mean()
    return gram


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
        return torch.zeros(0, 0, dtype=torch.float64)
    return curvature_gram(loss, outputs, tangents)


def inner(x: Direction, y: Direction) -> float:
    """sum over shared parameters of <x_p, y_p> (each dot product in the tensors' dtype, summed in Python)."""
    return sum(float(torch.vdot(x[name].reshape(-1), y[name].reshape(-1))) for name in x if name in y)


@dataclass(frozen=True)
class QuadraticSolution:
    """Coefficients c minimising M(sum_a c_a d_a), and the model's decrease M(delta) - M(0) there."""

    coefficients: tuple[float, ...]
    decrease: float


def solve_quadratic_model(gram_f: torch.Tensor, gram_i: torch.Tensor, gradient: torch.Tensor, damping: float,
                          nonnegative: Sequence[bool] | None = None, max_condition: float | None = None) -> QuadraticSolution:
    """Minimise 1/2 c^T (gram_f + damping gram_i) c + gradient^T c over c (paper sec 7's 2x2 system).

    ``gram_f`` holds d_a^T F d_b, ``gram_i`` d_a^T d_b and ``gradient`` grad^T d_a; damping = lambda + eta.
    Directions that are zero or make the system singular (the first step has no previous update) are
    dropped, so the result is the best combination of the others. At the optimum M - M(0) = 1/2 grad^T c.

    Bounds (the default preset's; the paper's algorithm has none): ``nonnegative[a]`` keeps c_a >= 0, so a
    descent direction is never taken uphill, and a system whose matrix, scaled to a unit diagonal, has a
    condition number above ``max_condition`` is treated as singular (nearly parallel directions give
    coefficients of opposite sign and huge size that fit the sub-batch's noise). The bounded minimiser is
    exact: with bounds at zero it is the unconstrained minimiser over some subset of the directions, so every
    subset is solved (k <= 3 here) and the feasible one with the lowest model value is kept.
    """
    matrix = (gram_f + damping * gram_i).double()
    gradient = gradient.double()
    keep = [a for a in range(len(gradient)) if float(gram_i[a, a]) > 0 and torch.isfinite(matrix[a]).all()]
    if nonnegative is None and max_condition is None:
        while keep:  # the paper's rule: drop the last direction until the system is solvable
            solution = _solve_on(matrix, gradient, keep)
            if solution is not None:
                return solution
            keep = keep[:-1]
        return QuadraticSolution(tuple(0.0 for _ in range(len(gradient))), 0.0)
    best = QuadraticSolution(tuple(0.0 for _ in range(len(gradient))), 0.0)
    for size in range(len(keep), 0, -1):
        for subset in itertools.combinations(keep, size):
            solution = _solve_on(matrix, gradient, list(subset), max_condition)
            if solution is None or solution.decrease >= best.decrease:
                continue
            if nonnegative is None or all(c >= 0 or not bound for c, bound in zip(solution.coefficients, nonnegative)):
                best = solution
    return best


def _solve_on(matrix: torch.Tensor, gradient: torch.Tensor, keep: list[int],
              max_condition: float | None = None) -> QuadraticSolution | None:
    """The minimiser over the directions ``keep`` (the others at 0), or None where their system is singular,
    not positive definite, or (scaled to a unit diagonal) worse conditioned than ``max_condition``."""
    sub = matrix[keep][:, keep]
    if torch.linalg.matrix_rank(sub) < len(keep):
        return None
    scale = sub.diagonal().clamp_min(torch.finfo(sub.dtype).tiny).rsqrt()
    eigenvalues = torch.linalg.eigvalsh(sub * scale[:, None] * scale[None, :])
    if float(eigenvalues.min()) <= 0:
        return None
    if max_condition is not None and float(eigenvalues.max() / eigenvalues.min()) > max_condition:
        return None
    solved = -torch.linalg.solve(sub, gradient[keep])
    coefficients = [0.0] * len(gradient)
    for a, value in zip(keep, solved.tolist()):
        coefficients[a] = value
    return QuadraticSolution(tuple(coefficients), 0.5 * float(gradient[keep] @ solved))
