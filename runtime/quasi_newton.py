"""The quasi-Newton maths of K-BFGS (Ren's thesis, secs 2.3-2.5 and 3.3-3.6) as pure torch functions.

BFGS needs s^T y > 0, which nothing guarantees for a layer's pre-activation pair (s, y), so the pair is damped
first (Powell's damping on H, then Powell's damping with B = I or a Levenberg-Marquardt term) and only then fed to
BFGS or L-BFGS. Vectors are [d], H is [d, d]; any float dtype. Nothing here modifies its inputs, and every
result is finite on finite input: a pair with no usable curvature (s^T y <= eps |s| |y|, e.g. y = 0 or
s^T y = 0) is skipped, i.e. leaves H unchanged. The damping functions and bfgs_update never read a tensor on the
host (no sync); lbfgs_two_loop and LBFGSMatrix.push read s^T y once per pair to decide whether to keep it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _usable(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """s^T y > eps |s| |y| (0-dim bool): the pair carries positive curvature that 1 / s^T y can hold."""
    return s @ y > torch.finfo(s.dtype).eps * torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)


def bfgs_update(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T, rho = 1 / s^T y (eqs. (2.6), (3.11)), symmetrised.

    A new tensor; H is not modified (the caller stores the result). A pair that is not usable (see the module
    docstring), or an update that is not finite, returns a copy of H: the pair is skipped."""
    h = H @ y
    sty = s @ y
    ok = _usable(s, y)
    rho = torch.where(ok, 1 / torch.where(ok, sty, torch.ones_like(sty)), torch.zeros_like(sty))
    # expanded with H = H^T: H - rho (s h^T + h s^T) + (rho + rho^2 y^T H y) s s^T, h = H y
    new = H - rho * (torch.outer(s, h) + torch.outer(h, s)) + (rho + rho * rho * (y @ h)) * torch.outer(s, s)
    new = (new + new.mT) / 2
    return torch.where(ok & torch.isfinite(new).all(), new, H.clone())  # skipped: H bit for bit, unsymmetrised


def _powell(u: torch.Tensor, w: torch.Tensor, mw: torch.Tensor, mu: float) -> torch.Tensor:
    """u~ = theta u + (1 - theta) M w with theta = (1 - mu) w^T M w / (w^T M w - u^T w) if u^T w < mu w^T M w,
    else 1; gives u~^T w >= mu w^T M w. (u, w, M) = (s, y, H) is Powell's damping on H, (y, s, B) on B."""
    wmw, uw = w @ mw, u @ w
    damp = uw < mu * wmw
    denominator = torch.where(damp, wmw - uw, torch.ones_like(uw))  # > (1 - mu) w^T M w >= 0 when damped, mu < 1
    theta = torch.where(damp, (1 - mu) * wmw / denominator, torch.ones_like(uw))
    return theta * u + (1 - theta) * mw


def _require(ok: bool, name: str, value: object, interval: str) -> None:
    """The thesis's parameter ranges; outside them a damped denominator can vanish."""
    if not ok:
        raise ValueError(f"{name} must lie in {interval}, got {value}")


def powell_damping_h(s: torch.Tensor, y: torch.Tensor, H: torch.Tensor, mu1: float) -> torch.Tensor:
    """Powell's damping on H (sec 2.3.1; Alg. 3 lines 2-3, Alg. 8 lines 2-7): s~ = theta s + (1 - theta) H y,
    theta = (1 - mu1) y^T H y / (y^T H y - s^T y) if s^T y < mu1 y^T H y else 1, so s~^T y >= mu1 y^T H y.
    y = 0 returns s (theta = 1)."""
    _require(0 < mu1 < 1, "mu1", mu1, "(0, 1)")
    return _powell(s, y, H @ y, mu1)


def powell_damping_identity(s_tilde: torch.Tensor, y: torch.Tensor, mu2: float) -> torch.Tensor:
    """Powell's damping with B = I (Alg. 3 lines 4-5): y~ = theta y + (1 - theta) s~, theta = (1 - mu2) s~^T s~ /
    (s~^T s~ - s~^T y) if s~^T y < mu2 s~^T s~ else 1, so s~^T y~ >= mu2 s~^T s~. s~ = 0 returns y."""
    _require(0 < mu2 <= 1, "mu2", mu2, "(0, 1]")
    return _powell(y, s_tilde, s_tilde, mu2)


def lm_damping(s_tilde: torch.Tensor, y: torch.Tensor, mu2: float) -> torch.Tensor:
    """Levenberg-Marquardt damping on H^-1 (Alg. 8 and 11, line 8): y~ = y + mu2 s~; with s~^T y >= 0 from the
    Powell step, s~^T y~ >= mu2 |s~|^2."""
    return y + mu2 * s_tilde


def double_damping(
    s: torch.Tensor, y: torch.Tensor, H: torch.Tensor, mu1: float, mu2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DD (Alg. 3, K-BFGS-20): Powell on H then Powell with B = I; 0 < mu1 < 1, 0 < mu2 <= 1 (sec 2.3.1).
    Guarantees s~^T y >= mu1 y^T H y and s~^T y~ >= mu2 s~^T s~ (y^T H y / s~^T y~ <= 1/mu1 is not guaranteed).
    s = y = 0 returns zeros, which bfgs_update and LBFGSMatrix.push skip."""
    s_tilde = powell_damping_h(s, y, H, mu1)
    return s_tilde, powell_damping_identity(s_tilde, y, mu2)


def powell_lm_damping(
    s: torch.Tensor, y: torch.Tensor, H: torch.Tensor, mu1: float, mu2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """D_P D_LM (Alg. 8): Powell on H, then y~ = y + mu2 s~; 0 < mu1 < 1, mu2 > 0.
    Guarantees s~^T y >= mu1 y^T H y >= 0 and s~^T y~ >= mu2 |s~|^2. s = y = 0 returns zeros (skipped later)."""
    _require(mu2 > 0, "mu2", mu2, "(0, inf)")
    s_tilde = powell_damping_h(s, y, H, mu1)
    return s_tilde, lm_damping(s_tilde, y, mu2)


def powell_identity_lm_damping(
    s: torch.Tensor, y: torch.Tensor, mu1: float, mu2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """D_P(I) D_LM (Alg. 11): D_P D_LM with H = mu2^-1 I. Lemma 4: s~^T s~ / s~^T y~ <= 1/mu2 and
    y~^T y~ / s~^T y~ <= 1/mu3, mu3 = mu1 / (mu2 (1 + 2 mu1)). s = y = 0 returns zeros (skipped later)."""
    _require(0 < mu1 < 1 and mu2 > 0, "(mu1, mu2)", (mu1, mu2), "(0, 1) x (0, inf)")
    s_tilde = _powell(s, y, y / mu2, mu1)
    return s_tilde, lm_damping(s_tilde, y, mu2)


def lbfgs_two_loop(
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], v: torch.Tensor, gamma: float
) -> torch.Tensor:
    """H v by the two-loop recursion (Nocedal & Wright, Alg. 7.4) with H0 = gamma I; pairs oldest first.
    Pairs that are not usable (see the module docstring) are skipped, as LBFGSMatrix.push skips them."""
    kept = [(s, y, 1 / (s @ y)) for s, y in pairs if bool(_usable(s, y))]
    q, alphas = v.clone(), []
    for s, y, rho in reversed(kept):
        alpha = rho * (s @ q)
        q = q - alpha * y
        alphas.append(alpha)
    r = gamma * q
    for (s, y, rho), alpha in zip(kept, reversed(alphas)):
        r = r + (alpha - rho * (y @ r)) * s
    return r


class LBFGSMatrix:
    """The L-BFGS inverse Hessian H of the last ``capacity`` pairs, H0 = gamma I, applied to a matrix in the
    compact ("non-loop") form of Byrd, Nocedal and Schnabel (thesis ref. [20], cited in secs 2.3 and 3.4.3; the
    thesis does not write the formula out):

        H = gamma I + [S  gamma Y] [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]] [S^T; gamma Y^T],

    S, Y: [d, p] with the pairs as columns, oldest first; R: upper triangle of S^T Y; D: its diagonal.
    H is symmetric, so V^T H = (H V)^T: no ``matmul_left``. ``gamma`` may be reassigned between products."""

    def __init__(self, capacity: int, gamma: float) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.gamma = capacity, gamma
        self.s: torch.Tensor | None = None  # [d, p], oldest column first
        self.y: torch.Tensor | None = None
        self._small: tuple[torch.Tensor, torch.Tensor] | None = None  # (R, Y^T Y), recomputed after a push

    def __len__(self) -> int:
        return 0 if self.s is None else self.s.shape[1]

    def push(self, s: torch.Tensor, y: torch.Tensor) -> bool:
        """Store (s, y), dropping the oldest pair beyond capacity; a pair that is not usable is skipped (False).
        Reads s^T y on the host (one sync) to decide."""
        if not bool(_usable(s, y)):
            return False
        if self.s is None or self.y is None:
            self.s, self.y = s[:, None].clone(), y[:, None].clone()
        else:
            first = max(0, len(self) + 1 - self.capacity)  # the oldest column kept
            self.s = torch.cat([self.s[:, first:], s[:, None]], 1)
            self.y = torch.cat([self.y[:, first:], y[:, None]], 1)
        self._small = None
        return True

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """H V for V [d, k] (or [d]): two [d, 2p] x [2p, k]-sized products plus p x p triangular solves."""
        if self.s is None or self.y is None:
            return self.gamma * V
        vector = V.dim() == 1
        V = V[:, None] if vector else V
        S, Y, g = self.s, self.y, self.gamma
        if self._small is None:
            self._small = (torch.triu(S.mT @ Y), Y.mT @ Y)
        R, yty = self._small
        SY = torch.cat([S, Y], 1)
        sv, yv = (SY.mT @ V).split(S.shape[1])  # S^T V, Y^T V
        P = torch.linalg.solve_triangular(R, sv, upper=True)  # R^-1 S^T V
        inner = (torch.diag_embed(torch.diagonal(R)) + g * yty) @ P - g * yv
        Q = torch.linalg.solve_triangular(R.mT, inner, upper=False)  # R^-T ((D + g Y^T Y) P - g Y^T V)
        out = g * V + SY @ torch.cat([Q, -g * P])
        return out[:, 0] if vector else out

    def to_dense(self, d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """H as a dense [d, d] matrix, H I (tests only; dtype/device of the stored pairs once there are any)."""
        like = self.s if self.s is not None else torch.empty(0, dtype=dtype)
        return self.matmul(torch.eye(d, dtype=like.dtype, device=like.device))

    def state_dict(self) -> dict[str, Any]:
        """Settings and stored pairs (clones); the derived p x p matrices are recomputed bit for bit from them."""
        return {"capacity": self.capacity, "gamma": self.gamma, "s": _clone(self.s), "y": _clone(self.y)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (tensors cloned)."""
        self.capacity, self.gamma = int(state["capacity"]), float(state["gamma"])
        self.s, self.y = _clone(state["s"]), _clone(state["y"])
        self._small = None


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()
