"""The block-tridiagonal inverse approximation of K-FAC (paper sec 4.3 and Appendix B) for a chain of linears.

For consecutive linear layers 1..L (layer i+1 takes layer i's output after a nonlinearity), F̆ has the
diagonal blocks A_{i-1,i-1} kron G_{i,i} and the off-diagonal blocks A_{i-1,i} kron G_{i,i+1}, where
A_{i-1,i} = E[a_bar_{i-1} a_bar_i^T] pairs layer i's input with layer i+1's input and G_{i,i+1} = E[g_i g_{i+1}^T].
F̂^{-1} is the block-tridiagonal matrix that agrees with F̆ on the tridiagonal blocks: the precision of a
directed Gaussian chain from the top layer down, F̂^{-1} = Xi^T Lambda Xi with
Psi_{i,i+1} = Psi^A_{i-1,i} kron Psi^G_{i,i+1}, Psi^A = A_{i-1,i} A_{i,i}^-1, Psi^G = G_{i,i+1} G_{i+1,i+1}^-1,
Sigma_{i|i+1} = A_{i-1,i-1} kron G_{i,i} - C kron D, C = Psi^A A_{i,i} Psi^A^T, D = Psi^G G_{i+1,i+1} Psi^G^T.

Damping (sec 6.3, "all of the computations of 4.3 can still be used ... replacing each A_{i-1,i-1} and G_{i,i}
with their modified versions"): every diagonal factor is damped first, A + pi_i gamma I and G + (gamma/pi_i) I
with pi_i from the undamped traces (runtime/inverse.trace_pi), and Psi, Sigma are computed from the damped
factors; the cross-moments are not damped. Then each damped 2x2 block of F̆ is a principal submatrix of the
Kronecker product of two positive definite joint moment matrices, so Sigma_{i|i+1} is positive definite.

Sigma^-1 uses Appendix B in its generalized-eigenvalue form (no matrix square roots): with L the Cholesky
factor of A_d, L^-1 C L^-T = E1 diag(s1) E1^T, K1 = L^-T E1 (so K1^T A_d K1 = I, K1^T C K1 = diag(s1)), and K2,
s2 likewise for (G_d, D): Sigma^-1 vec(V) = vec(K2 [(K2^T V K1) / (1 - s2 s1^T)] K1^T). Everything is a
product of factor-sized matrices; the full Kronecker matrices are only formed by ``to_dense`` (tests).

vec convention as runtime/wbar.py: (A kron G) vec(X) = vec(G X A^T), W_bar is [out, a_dim], bias column last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kronograph.errors import KronographError
from kronograph.passes.plan import Layer
from kronograph.runtime.inverse import trace_pi


class UnsupportedChainError(KronographError):
    """The layers cannot form a tridiagonal chain (a convolution, groups, mismatched shapes)."""


class TridiagonalInverseError(RuntimeError):
    """The tridiagonal inverse could not be computed (non-finite statistics, a factor not positive
    definite); the caller should keep its previous inverse or fall back to the block-diagonal one."""


# -- statistics --------------------------------------------------------------------------------------
def check_chain(layers: Sequence[Layer]) -> None:
    """Raise UnsupportedChainError unless every layer is an ungrouped linear with a single site: the
    cross-moments pair one input row of a layer with one input row of the next, per example."""
    for layer in layers:
        if layer.kind not in ("linear", "embedding") or layer.groups != 1:
            raise UnsupportedChainError(
                f"layer {layer.name!r} ({layer.kind}): the block-tridiagonal inverse supports linear layers only; "
                "use the block-diagonal inverse for models with convolutions"
            )
        if len(layer.sites) > 1:
            raise UnsupportedChainError(
                f"layer {layer.name!r} shares its weight across {len(layer.sites)} sites: no tridiagonal chain; "
                "use the block-diagonal inverse"
            )


def homogeneous_rows(layer: Layer, a: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """a_bar rows [n, a_dim] of a layer's per-example inputs a [n, in] (the 1 appended when it has a bias)."""
    if a.dim() != 2 or a.shape[1] != layer.in_features:
        raise UnsupportedChainError(
            f"layer {layer.name!r}: inputs of shape {tuple(a.shape)}, expected [n, {layer.in_features}] "
            "(one row per example)"
        )
    a = a.to(dtype)
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a


def chain_factors(
    layers: Sequence[Layer],
    inputs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    grad_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(A_diag, G_diag, A_cross, G_cross) of one mini-batch, from the same n examples for every layer.

    A_diag[i] = mean a_bar_i a_bar_i^T, G_diag[i] = mean g_i g_i^T (as runtime/factors.py), A_cross[i] =
    mean a_bar_i a_bar_{i+1}^T [a_dim_i, a_dim_{i+1}], G_cross[i] = mean g_i g_{i+1}^T [out_i, out_{i+1}].
    Computing all four from the same rows keeps the joint moment matrices PSD, which Sigma's positivity
    needs (so fold them into EMAs with one decay). ``grads`` are per-example g = dl_n/ds; pass
    grad_scale = n for gradients captured from a mean loss (they are g / n).
    """
    check_chain(layers)
    if not (len(layers) == len(inputs) == len(grads)) or len(layers) < 1:
        raise UnsupportedChainError(f"{len(layers)} layers, {len(inputs)} inputs and {len(grads)} gradients")
    rows_a = [homogeneous_rows(layer, a, dtype) for layer, a in zip(layers, inputs)]
    rows_g = []
    for layer, g in zip(layers, grads):
        if g.dim() != 2 or g.shape[1] != layer.out_features:
            raise UnsupportedChainError(
                f"layer {layer.name!r}: gradients of shape {tuple(g.shape)}, expected [n, {layer.out_features}]"
            )
        rows_g.append(g.to(dtype) * grad_scale)
    n = rows_a[0].shape[0]
    if n < 1 or any(r.shape[0] != n for r in rows_a + rows_g):
        raise UnsupportedChainError("every layer's inputs and gradients must hold the same n >= 1 examples")

    def moment(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.T @ y / n

    a_diag = [_symmetric(moment(r, r)) for r in rows_a]
    g_diag = [_symmetric(moment(r, r)) for r in rows_g]
    a_cross = [moment(rows_a[i], rows_a[i + 1]) for i in range(len(layers) - 1)]
    g_cross = [moment(rows_g[i], rows_g[i + 1]) for i in range(len(layers) - 1)]
    return a_diag, g_diag, a_cross, g_cross


def _symmetric(x: torch.Tensor) -> torch.Tensor:
    return (x + x.T) / 2


def _matrix(x: torch.Tensor, what: str) -> torch.Tensor:
    """A factor as [d, e]: a one-group [1, d, e] (KroneckerBlock's layout) is squeezed."""
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise UnsupportedChainError(f"{what}: expected a matrix (or one group), got shape {tuple(x.shape)}")
    return x


# -- the inverse -------------------------------------------------------------------------------------
class TridiagonalInverse:
    """F̂^{-1} = Xi^T Lambda Xi of a damped chain, applied to W_bar gradients with factor-sized products.

    Built once per inverse refresh (Choleskys and eigh of factor size, in ``compute_dtype``, float64 by
    default: the generalized eigenvalues near 1 are where float32 loses Sigma's positivity); applied every
    step in ``dtype`` (default: the diagonal factors' dtype).
    """

    def __init__(
        self,
        a_diag: Sequence[torch.Tensor],
        g_diag: Sequence[torch.Tensor],
        a_cross: Sequence[torch.Tensor],
        g_cross: Sequence[torch.Tensor],
        gamma: float,
        *,
        names: Sequence[str] | None = None,
        compute_dtype: torch.dtype = torch.float64,
        dtype: torch.dtype | None = None,
    ) -> None:
        count = len(a_diag)
        self.names = list(names) if names is not None else [str(i) for i in range(count)]
        if count < 1 or len(g_diag) != count or len(a_cross) != count - 1 or len(g_cross) != count - 1:
            raise UnsupportedChainError(
                f"a chain of {count} layers needs {count} A and G factors and {count - 1} cross factors of each; "
                f"got {len(g_diag)} G, {len(a_cross)} A_cross, {len(g_cross)} G_cross"
            )
        if len(self.names) != count:
            raise UnsupportedChainError(f"{len(self.names)} names for {count} layers")
        gamma = float(gamma)
        if not (gamma >= 0 and gamma < float("inf")):
            raise TridiagonalInverseError(f"factor damping gamma must be finite and >= 0, got {gamma}")
        self.gamma = gamma
        self.dtype = dtype or _matrix(a_diag[0], "A").dtype

        def own(x: torch.Tensor, what: str) -> torch.Tensor:
            x = _matrix(x, what).to(compute_dtype)
            if not bool(torch.isfinite(x).all()):
                raise TridiagonalInverseError(f"{what} holds NaN/Inf; the tridiagonal inverse was not computed")
            return x

        a = [own(x, f"A of layer {self.names[i]!r}") for i, x in enumerate(a_diag)]
        g = [own(x, f"G of layer {self.names[i]!r}") for i, x in enumerate(g_diag)]
        ax = [own(x, f"A_cross of layers {self.names[i]!r}, {self.names[i + 1]!r}") for i, x in enumerate(a_cross)]
        gx = [own(x, f"G_cross of layers {self.names[i]!r}, {self.names[i + 1]!r}") for i, x in enumerate(g_cross)]
        for i in range(count - 1):
            if ax[i].shape != (a[i].shape[0], a[i + 1].shape[0]) or gx[i].shape != (g[i].shape[0], g[i + 1].shape[0]):
                raise UnsupportedChainError(
                    f"cross factors of layers {self.names[i]!r}, {self.names[i + 1]!r} have shapes "
                    f"{tuple(ax[i].shape)}, {tuple(gx[i].shape)}; expected {(a[i].shape[0], a[i + 1].shape[0])}, "
                    f"{(g[i].shape[0], g[i + 1].shape[0])}"
                )
        # damping on the diagonal factors only (sec 6.3), pi from the undamped traces
        self.pi = [float(trace_pi(ai[None], gi[None])[0]) for ai, gi in zip(a, g)]
        a_damped = [ai + p * gamma * torch.eye(ai.shape[0], dtype=ai.dtype, device=ai.device) for ai, p in zip(a, self.pi)]
        g_damped = [gi + gamma / p * torch.eye(gi.shape[0], dtype=gi.dtype, device=gi.device) for gi, p in zip(g, self.pi)]
        chol_a = [self._cholesky(m, f"damped A of layer {n!r}") for m, n in zip(a_damped, self.names)]
        chol_g = [self._cholesky(m, f"damped G of layer {n!r}") for m, n in zip(g_damped, self.names)]
        # Psi^A_i = A_cross_i A_d{i+1}^-1 and Psi^G_i = G_cross_i G_d{i+1}^-1 (solves against symmetric factors)
        self.psi_a = [torch.cholesky_solve(ax[i].T, chol_a[i + 1]).T for i in range(count - 1)]
        self.psi_g = [torch.cholesky_solve(gx[i].T, chol_g[i + 1]).T for i in range(count - 1)]
        self.k_a: list[torch.Tensor] = []
        self.k_g: list[torch.Tensor] = []
        self.denominator: list[torch.Tensor] = []
        for i in range(count):
            if i < count - 1:  # C = Psi^A A_d{i+1} Psi^A^T = A_cross Psi^A^T, D likewise
                c, d = ax[i] @ self.psi_a[i].T, gx[i] @ self.psi_g[i].T
            else:  # the top layer is unconditioned: Sigma_L = A_d kron G_d
                c, d = torch.zeros_like(a[i]), torch.zeros_like(g[i])
            k1, s1 = self._generalized_eigh(chol_a[i], c, f"A of layer {self.names[i]!r}")
            k2, s2 = self._generalized_eigh(chol_g[i], d, f"G of layer {self.names[i]!r}")
            denominator = 1.0 - s2[:, None] * s1[None, :]
            if not bool((denominator > 100 * torch.finfo(compute_dtype).eps).all()):
                raise TridiagonalInverseError(
                    f"the conditional covariance of layer {self.names[i]!r} given the next layer is not positive "
                    "definite: the cross-moments do not match the diagonal factors (fold all of them from the "
                    "same batches with one decay) or factor_damping is too small"
                )
            self.k_a.append(k1.to(self.dtype))
            self.k_g.append(k2.to(self.dtype))
            self.denominator.append(denominator.to(self.dtype))
        self.psi_a = [p.to(self.dtype) for p in self.psi_a]
        self.psi_g = [p.to(self.dtype) for p in self.psi_g]

    @staticmethod
    def _cholesky(m: torch.Tensor, what: str) -> torch.Tensor:
        factor, info = torch.linalg.cholesky_ex(m)
        if int(info) != 0 or not bool(torch.isfinite(factor).all()):
            raise TridiagonalInverseError(f"{what} is not positive definite (raise factor_damping)")
        return factor

    @staticmethod
    def _generalized_eigh(chol: torch.Tensor, c: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """K, s with K^T M K = I and K^T C K = diag(s), M = chol chol^T: Appendix B without square roots.
        s is clipped at 0 (C is PSD; rounding can make tiny eigenvalues negative)."""
        half = torch.linalg.solve_triangular(chol, c, upper=False)  # L^-1 C
        whitened = torch.linalg.solve_triangular(chol, half.T, upper=False)  # L^-1 C L^-T
        s, e = torch.linalg.eigh(_symmetric(whitened))
        k = torch.linalg.solve_triangular(chol.T, e, upper=True)  # L^-T E
        if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(k).all())):
            raise TridiagonalInverseError(f"the eigendecomposition for {what} is not finite")
        return k, s.clamp_min(0)

    def __len__(self) -> int:
        return len(self.k_a)

    def apply(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """F̂^{-1} vec(W_bar_i) for the chain's gradients [out_i, a_dim_i] (or [1, out_i, a_dim_i]), returned
        in the same shapes, in ``dtype``, without the minus sign: U = Xi^T (Lambda (Xi V))."""
        if len(grads) != len(self):
            raise UnsupportedChainError(f"{len(grads)} gradients for a chain of {len(self)} layers")
        v = []
        for i, grad in enumerate(grads):
            m = _matrix(grad, f"gradient of layer {self.names[i]!r}").to(self.dtype)
            if m.shape != (self.k_g[i].shape[0], self.k_a[i].shape[0]):
                raise UnsupportedChainError(
                    f"gradient of layer {self.names[i]!r} of shape {tuple(m.shape)}, expected "
                    f"{(self.k_g[i].shape[0], self.k_a[i].shape[0])}"
                )
            if not bool(torch.isfinite(m).all()):
                raise TridiagonalInverseError(f"the gradient of layer {self.names[i]!r} holds NaN/Inf")
            v.append(m)
        last = len(self) - 1
        # Xi: U_i = V_i - Psi^G_i V_{i+1} Psi^A_i^T (the top layer unchanged)
        u = [v[i] - self.psi_g[i] @ v[i + 1] @ self.psi_a[i].T if i < last else v[i] for i in range(len(self))]
        # Lambda: Sigma_i^-1 by the generalized eigenbases
        w = [
            self.k_g[i] @ ((self.k_g[i].T @ u[i] @ self.k_a[i]) / self.denominator[i]) @ self.k_a[i].T
            for i in range(len(self))
        ]
        # Xi^T: X_i = W_i - Psi^G_{i-1}^T W_{i-1} Psi^A_{i-1} (the bottom layer unchanged)
        out = [w[i] - self.psi_g[i - 1].T @ w[i - 1] @ self.psi_a[i - 1] if i > 0 else w[i] for i in range(len(self))]
        return [x.reshape(grad.shape) for x, grad in zip(out, grads)]

    __call__ = apply

    _STATE = ("names", "gamma", "dtype", "pi", "psi_a", "psi_g", "k_a", "k_g", "denominator")

    def state_dict(self) -> dict:
        """What ``apply`` needs (checkpoints resume with the same inverse, not one rebuilt from newer factors)."""
        return {key: getattr(self, key) for key in self._STATE}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TridiagonalInverse":
        inverse = cls.__new__(cls)
        for key in cls._STATE:
            setattr(inverse, key, state[key])
        return inverse

    def to_dense(self) -> torch.Tensor:
        """The dense F̂^{-1} = Xi^T Lambda Xi in the vec convention (tests, tiny chains only)."""
        sizes = [k_g.shape[0] * k_a.shape[0] for k_a, k_g in zip(self.k_a, self.k_g)]
        total = sum(sizes)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        xi = torch.eye(total, dtype=self.dtype, device=self.k_a[0].device)
        for i in range(len(self) - 1):
            block = torch.kron(self.psi_a[i], self.psi_g[i])
            xi[offsets[i] : offsets[i] + sizes[i], offsets[i + 1] : offsets[i + 1] + sizes[i + 1]] = -block
        lam = torch.block_diag(
            *[
                torch.kron(k_a, k_g) @ torch.diag(1.0 / d.T.reshape(-1)) @ torch.kron(k_a, k_g).T
                for k_a, k_g, d in zip(self.k_a, self.k_g, self.denominator)
            ]
        )
        return xi.T @ lam @ xi
