"""A tied table's block: the exact damped inverse of a sum of two Kronecker products.

A [rows, dim] weight read as an embedding table and as an output layer's weight (passes/match/tied.py) has two
KroneckerBlocks, one a use: the output layer's, A_h [c, c] (c = dim, + 1 with the head's bias) and G_h [rows,
rows], and the table's, A_e [rows, rows] (or its diagonal) and G_e [dim, dim]. In the head's W_bar coordinates
X [rows, c] the weight's Fisher block is F(X) = G_h X A_h + A_e X G_e, G_e padded with a zero row and column for
the bias (the table has none) - the sum KFAC-expand takes for a weight two layers share. Each use is damped as
a block of its own (factored Tikhonov, paper sec 6.3, with ``inverse.py``'s centring and floors) at strength
gamma / sqrt(2), so that the two add gamma^2 I between them as one block's damping does.

Two Kronecker terms are inverted exactly by one generalized eigendecomposition a side: U with U^T A_e' U = I
and U^T G_h' U = diag(l), V with V^T G_e' V = I and V^T A_h' V = diag(m). Then U^T F'(U Y V^T) V = diag(l) Y
diag(m) + Y, so F'^-1 R = U ((U^T R V) / (l m^T + 1)) V^T, the division entrywise: two products a side, as a
Kronecker solve. A side wider than ``max_dim`` is decomposed in contiguous diagonal blocks (both of its matrices'
off-diagonal blocks taken as 0, as ``inverse.block_diagonal_inverse`` does for one factor). A vocabulary's tie
(K-FAC's ``diagonal_output_g``) keeps the head's G and the table's A as their diagonals: its row side is then
U = diag(a_e'^-1/2), l = g_h' / a_e', kept as vectors, and a 50257-word tie costs what its columns do.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import torch

from kronograph.runtime.inverse import InverseWarning, all_finite, diagonal_block_sizes, factor_dampings

#: Each use's share of gamma^2: the two uses' damping add up to one block's.
USE_SHARE = 0.5


@dataclasses.dataclass
class TiedInverses:
    """F'^-1 of a tie as the two sides' generalized eigenbases, each kept as its diagonal blocks (``rows``: U as
    [blocks, width, width], or as its diagonal [rows] where both row factors are diagonal; ``row_values``: l as
    [blocks, width], the last block padded by an identity with values 0; ``columns`` and ``column_values`` alike
    for V and m), and whether this inversion failed (the previous one kept)."""

    rows: torch.Tensor
    row_values: torch.Tensor
    columns: torch.Tensor
    column_values: torch.Tensor
    failed: torch.Tensor  # [1] bool, as DampedInverses' per group

    @property
    def ok(self) -> bool:
        return not bool(self.failed.any())

    def solve(self, grad_bar: torch.Tensor) -> torch.Tensor:
        """F'^-1 applied to the head's W_bar gradient [1, rows, c] (no minus sign), in the inverses' dtype."""
        grad = grad_bar[0].to(self.rows.dtype)
        rows, width = grad.shape
        inner = _times(self.columns, _times(self.rows, grad, transposed=True).T, transposed=True).T  # U^T R V
        values = self.row_values.reshape(-1)[:rows, None] * self.column_values.reshape(-1)[None, :width]
        inner = inner / (values + 1.0)
        return _times(self.rows, _times(self.columns, inner.T).T)[None]  # U inner V^T

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rows": self.rows, "row_values": self.row_values, "columns": self.columns,
                "column_values": self.column_values}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> TiedInverses:
        return cls(**state, failed=torch.zeros(1, dtype=torch.bool, device=state["rows"].device))


def _times(blocks: torch.Tensor, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """B x (or B^T x) for the block-diagonal B whose diagonal blocks are ``blocks`` [count, width, width] (its
    padding beyond x's rows unread): one batched product, no dense B; a diagonal B given as its diagonal [d]
    scales x's rows."""
    if blocks.dim() == 1:
        return blocks[:, None] * x
    count, width, _ = blocks.shape
    padded = x.new_zeros(count * width, x.shape[1])
    padded[:x.shape[0]] = x
    factor = blocks.transpose(1, 2) if transposed else blocks
    return (factor @ padded.view(count, width, -1)).reshape(count * width, -1)[:x.shape[0]]


def _damped(m: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """m [d, d] + damping I, or a diagonal m [d] + damping."""
    if m.dim() == 1:
        return m + damping
    return m + damping * torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def _generalized_eigh_block(m: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, values) with X^T b X = I and X^T m X = diag(values): b = L L^T, eigh of L^-1 m L^-T = Q diag Q^T, X =
    L^-T Q; b a diagonal [d] takes L = sqrt(b). Raises on a b that is not positive definite."""
    if b.dim() == 1:
        if not bool((b > 0).all()):
            raise torch.linalg.LinAlgError("not positive definite")
        scale = b.rsqrt()
        values, q = torch.linalg.eigh(scale[:, None] * m * scale[None, :])
        return scale[:, None] * q, values
    lower, info = torch.linalg.cholesky_ex(b)
    if int(info):
        raise torch.linalg.LinAlgError("not positive definite")
    half = torch.linalg.solve_triangular(lower, m, upper=False)  # L^-1 m
    inner = torch.linalg.solve_triangular(lower, half.T, upper=False)  # L^-1 m L^-T (m symmetric)
    values, q = torch.linalg.eigh(0.5 * (inner + inner.T))
    return torch.linalg.solve_triangular(lower.T, q, upper=True), values


def generalized_eigh(m: torch.Tensor, b: torch.Tensor, max_dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``_generalized_eigh_block`` of the pencil (m, b) in ``diagonal_block_sizes``' contiguous blocks: the blocks of
    the block-diagonal X, [count, width, width], and their values, [count, width] (a narrower last block padded by
    an identity and zeros). Both diagonal ([d], a vocabulary's diagonal head G and table A): X = diag(b^-1/2) as
    its diagonal [d], the values m / b; one diagonal, the other not: the diagonal one as a matrix."""
    if m.dim() == 1 and b.dim() == 1:
        if not bool((b > 0).all()):
            raise torch.linalg.LinAlgError("not positive definite")
        return b.rsqrt(), m / b
    if m.dim() == 1:
        m = torch.diag(m)
    d = m.shape[-1]
    sizes = diagonal_block_sizes(d, max_dim)
    width = sizes[0]
    basis = torch.eye(width, dtype=m.dtype, device=m.device).repeat(len(sizes), 1, 1)
    values = m.new_zeros(len(sizes), width)
    for i, size in enumerate(sizes):
        part = slice(i * width, i * width + size)
        block_b = b[part] if b.dim() == 1 else b[part, part]
        basis[i, :size, :size], values[i, :size] = _generalized_eigh_block(m[part, part], block_b)
    return basis, values


def _output_damped(a: torch.Tensor, g: torch.Tensor, gamma: float, centered: bool, floor: float, g_share: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The output layer's damped A_h' and G_h' (``inverse.factor_dampings``: its A in centred coordinates with
    ``centered``, A + damping T T^T, as ``inverse.factored_inverses`` damps a layer with a bias)."""
    mu, _, a_damping, g_damping = factor_dampings(a, g, gamma, centered, floor, g_share)
    if mu is None:
        return _damped(a[0], a_damping[0]), _damped(g[0], g_damping[0])
    shift = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)  # T = [[I, mu], [0, 1]]
    shift[:-1, -1] = mu[0]
    return a[0] + a_damping[0] * (shift @ shift.T), _damped(g[0], g_damping[0])


def _table_damped(a: torch.Tensor, g: torch.Tensor, gamma: float, floor: float, width: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The table's damped A_e' (dense or diagonal) and G_e' padded to ``width`` (the head's bias coordinate: 0
    but for the damping)."""
    _, _, a_damping, g_damping = factor_dampings(a, g, gamma, floor=floor)
    padded = g.new_zeros(width, width)
    padded[:g.shape[-1], :g.shape[-1]] = g[0]
    return _damped(a[0], a_damping[0]), _damped(padded, g_damping[0])


def tied_inverses(output: Sequence[torch.Tensor], table: Sequence[torch.Tensor], gamma: float,
                  previous: TiedInverses | None = None, *, name: str = "", centered: bool = False,
                  floor: float = 0.0, max_dim: int | None = None, g_share: float = 0.0,
                  knob: str = "factor_damping") -> TiedInverses:
    """F'^-1 of a tie from the output layer's (A_h, G_h) and the table's (A_e, G_e) EMAs (each [1, ...], the
    table's A maybe its diagonal [1, rows]), each use damped at gamma sqrt(USE_SHARE). Factors that are not
    finite, or a decomposition that fails in float64 too, keep ``previous`` (with none, the damping terms alone,
    the factors taken as 0), with an InverseWarning naming ``knob``."""
    each = gamma * math.sqrt(USE_SHARE)
    width = output[0].shape[-1]

    def decompose(a_h, g_h, a_e, g_e) -> TiedInverses:
        a_h_damped, g_h_damped = _output_damped(a_h, g_h, each, centered, floor, g_share)
        a_e_damped, g_e_damped = _table_damped(a_e, g_e, each, floor, width)
        rows, row_values = generalized_eigh(g_h_damped, a_e_damped, max_dim)
        columns, column_values = generalized_eigh(a_h_damped, g_e_damped, max_dim)
        found = TiedInverses(rows, row_values, columns, column_values, torch.zeros(1, dtype=torch.bool,
                                                                                   device=rows.device))
        if not all_finite(found.state_dict().values()):
            raise torch.linalg.LinAlgError("not finite")
        return found

    factors = (*output, *table)
    dtype = factors[0].dtype
    if all_finite(factors):
        for precision in dict.fromkeys((dtype, torch.float64)):
            try:
                found = decompose(*(f.to(precision) for f in factors))
                return TiedInverses(*(x.to(dtype) for x in found.state_dict().values()), found.failed)
            except torch.linalg.LinAlgError:
                continue
    warnings.warn(f"K-FAC tied block {name or '?'}: its damped factors are not finite or not positive definite; kept "
                  f"the previous inverse (raise {knob} if this repeats)", InverseWarning, stacklevel=2)
    kept = previous if previous is not None else decompose(*(torch.zeros_like(f) for f in factors))
    return dataclasses.replace(kept, failed=torch.ones(1, dtype=torch.bool, device=factors[0].device))
