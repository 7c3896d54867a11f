"""Quasi-Newton maths of K-BFGS against dense algebra written out here, and the thesis's damping inequalities."""

from __future__ import annotations

import pytest
import torch

from kronograph.runtime.quasi_newton import (
    LBFGSMatrix,
    bfgs_update,
    double_damping,
    lbfgs_two_loop,
    powell_damping_h,
    powell_identity_lm_damping,
    powell_lm_damping,
)

D = 6
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=g)


def spd(d: int, g: torch.Generator) -> torch.Tensor:
    m = randn(d, 2 * d, g=g)
    return m @ m.T / d + 0.1 * torch.eye(d, dtype=F64)


def positive_pair(g: torch.Generator, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """A random pair with s^T y > 0 (y = B s + noise, sign flipped if needed)."""
    s = randn(d, g=g)
    y = spd(d, g) @ s + 0.3 * randn(d, g=g)
    return s, y if s @ y > 0 else -y


def dense_bfgs(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. (2.6) with explicit matrices."""
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    rho = 1.0 / torch.dot(s, y)
    left = eye - rho * s[:, None] @ y[None, :]
    return left @ H @ left.T + rho * s[:, None] @ s[None, :]


def adversarial_pairs(g: torch.Generator, d: int = D) -> list[tuple[torch.Tensor, torch.Tensor]]:
    s = randn(d, g=g)
    u = randn(d, g=g)
    ortho = u - (u @ s) / (s @ s) * s
    zero = torch.zeros(d, dtype=F64)
    return [
        (s, -s),  # y = -s
        (s, -2 * s + 0.1 * u),  # s^T y < 0
        (s, zero),  # y = 0
        (zero, u),  # s = 0
        (zero, zero),
        (s, ortho),  # s^T y = 0
        (1e-8 * s, 1e6 * u),  # s tiny, y huge
        (1e6 * s, 1e-8 * u),  # s huge, y tiny
        (1e-8 * s, -1e6 * s),  # tiny s, huge y, negative curvature
        (s, s),
    ]


def all_pairs(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = gen(seed)
    rand = [(randn(D, g=g), randn(D, g=g)) for _ in range(10)]  # either sign of s^T y
    return rand + adversarial_pairs(g)


def geq(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> bool:
    """a >= b up to rounding of the size of ``scale``."""
    return bool(a >= b - 1e-10 * scale)


# ---------------------------------------------------------------------------------------------- BFGS


def test_bfgs_update_secant_symmetric_positive_definite_and_pure() -> None:
    g = gen(0)
    H = spd(D, g)
    for _ in range(5):
        s, y = positive_pair(g)
        before = H.clone()
        new = bfgs_update(H, s, y)
        assert torch.equal(H, before) and new is not H
        torch.testing.assert_close(new, dense_bfgs(H, s, y), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(new @ y, s, rtol=1e-10, atol=1e-12)
        assert torch.equal(new, new.T)
        assert torch.linalg.eigvalsh(new).min() > 0
        H = new


@pytest.mark.parametrize("case", ["y=0", "s=0", "sTy=0", "sTy<0", "both 0"])
def test_bfgs_update_skips_pairs_without_curvature(case: str) -> None:
    g = gen(1)
    H = spd(D, g)
    s, u = randn(D, g=g), randn(D, g=g)
    zero = torch.zeros(D, dtype=F64)
    s, y = {
        "y=0": (s, zero),
        "s=0": (zero, u),
        "sTy=0": (s, u - (u @ s) / (s @ s) * s),
        "sTy<0": (s, -s),
        "both 0": (zero, zero),
    }[case]
    new = bfgs_update(H, s, y)
    assert torch.isfinite(new).all()
    torch.testing.assert_close(new, H, rtol=0, atol=0)


def test_bfgs_update_keeps_dtype_float32() -> None:
    g = gen(2)
    H = spd(D, g).float()
    s, y = positive_pair(g)
    new = bfgs_update(H, s.float(), y.float())
    assert new.dtype == torch.float32
    torch.testing.assert_close(new @ y.float(), s.float(), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------- L-BFGS


@pytest.mark.parametrize("capacity", [1, 3, 7])
@pytest.mark.parametrize("extra", [0, 4])  # extra > 0: more pushes than capacity, the oldest are dropped
def test_lbfgs_compact_equals_two_loop_and_dense_bfgs(capacity: int, extra: int) -> None:
    g = gen(10 * capacity + extra)
    d, gamma = 9, 0.7
    pairs = [positive_pair(g, d) for _ in range(capacity + extra)]
    lbfgs = LBFGSMatrix(capacity, gamma)
    assert all(lbfgs.push(s, y) for s, y in pairs)
    assert len(lbfgs) == capacity
    kept = pairs[-capacity:]

    dense = gamma * torch.eye(d, dtype=F64)
    for s, y in kept:
        dense = dense_bfgs(dense, s, y)

    V = randn(d, 5, g=g)
    torch.testing.assert_close(lbfgs.matmul(V), dense @ V, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(lbfgs.matmul(V[:, 0]), dense @ V[:, 0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(lbfgs.to_dense(d), dense, rtol=1e-9, atol=1e-10)
    for j in range(V.shape[1]):
        torch.testing.assert_close(lbfgs_two_loop(kept, V[:, j], gamma), dense @ V[:, j], rtol=1e-9, atol=1e-10)


def test_lbfgs_empty_is_gamma_identity_and_skips_bad_pairs() -> None:
    g = gen(3)
    lbfgs = LBFGSMatrix(4, 2.0)
    V = randn(D, 3, g=g)
    torch.testing.assert_close(lbfgs.matmul(V), 2.0 * V)
    s = randn(D, g=g)
    zero = torch.zeros(D, dtype=F64)
    for bad in [(s, zero), (zero, s), (zero, zero), (s, -s)]:
        assert not lbfgs.push(*bad)
        assert torch.isfinite(lbfgs_two_loop([bad], V[:, 0], 2.0)).all()
    assert len(lbfgs) == 0
    s, y = positive_pair(g)
    assert lbfgs.push(s, y) and not lbfgs.push(s, zero)
    assert len(lbfgs) == 1 and torch.isfinite(lbfgs.matmul(V)).all()


def test_lbfgs_state_dict_resumes_exactly() -> None:
    g = gen(4)
    a = LBFGSMatrix(3, 0.5)
    for _ in range(5):
        a.push(*positive_pair(g))
    V = randn(D, 4, g=g)
    a.matmul(V)  # fills the cache
    state = a.state_dict()
    b = LBFGSMatrix(1, 1.0)
    b.load_state_dict(state)
    assert torch.equal(a.matmul(V), b.matmul(V))
    state["s"].zero_()  # the state is a copy
    assert torch.equal(a.matmul(V), b.matmul(V))
    for _ in range(2):
        s, y = positive_pair(g)
        a.push(s, y), b.push(s, y)
    assert torch.equal(a.matmul(V), b.matmul(V))


# ---------------------------------------------------------------------------------------------- damping


MU1, MU2 = 0.2, 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_powell_lm_damping_inequalities(seed: int) -> None:
    """Alg. 8: s~^T y >= mu1 y^T H y after Powell's damping on H, s~^T y~ >= mu2 |s~|^2 after LM."""
    H = spd(D, gen(100 + seed))
    for mu2 in (MU2, 3.0):  # D_P D_LM allows any mu2 > 0
        for s, y in all_pairs(seed):
            st, yt = powell_lm_damping(s, y, H, MU1, mu2)
            assert torch.isfinite(st).all() and torch.isfinite(yt).all()
            torch.testing.assert_close(st, powell_damping_h(s, y, H, MU1), rtol=0, atol=0)
            yhy = y @ H @ y
            assert geq(st @ y, MU1 * yhy, st.norm() * y.norm() + yhy)
            assert geq(st @ yt, mu2 * (st @ st), st.norm() * yt.norm())


@pytest.mark.parametrize("seed", [0, 1])
def test_double_damping_inequalities(seed: int) -> None:
    """Alg. 3: s~^T y >= mu1 y^T H y after step 1 and s~^T y~ >= mu2 s~^T s~ after step 2 (sec 2.3.1), y~ a
    convex combination of y and s~."""
    H = spd(D, gen(200 + seed))
    for mu2 in (MU2, 1.0):
        for s, y in all_pairs(seed):
            st, yt = double_damping(s, y, H, MU1, mu2)
            assert torch.isfinite(st).all() and torch.isfinite(yt).all()
            yhy = y @ H @ y
            assert geq(st @ y, MU1 * yhy, st.norm() * y.norm() + yhy)
            assert geq(st @ yt, mu2 * (st @ st), st.norm() * yt.norm() + st @ st)
            # y~ - s~ = theta (y - s~) with theta in [0, 1]
            a, b = yt - st, y - st
            if b.norm() > 0:
                theta = (a @ b) / (b @ b)
                assert -1e-12 <= theta <= 1 + 1e-12
                torch.testing.assert_close(a, theta * b, rtol=1e-9, atol=1e-9 * float(b.norm()))


@pytest.mark.parametrize("seed", [0, 1])
def test_powell_identity_lm_damping_lemma_4(seed: int) -> None:
    """Alg. 11 and Lemma 4: s~^T y >= (mu1/mu2) y^T y, s~^T s~ / s~^T y~ <= 1/mu2, y~^T y~ / s~^T y~ <= 1/mu3."""
    mu3 = MU1 / (MU2 * (1 + 2 * MU1))
    H = torch.eye(D, dtype=F64) / MU2
    for s, y in all_pairs(seed):
        st, yt = powell_identity_lm_damping(s, y, MU1, MU2)
        assert torch.isfinite(st).all() and torch.isfinite(yt).all()
        expected = powell_lm_damping(s, y, H, MU1, MU2)
        torch.testing.assert_close((st, yt), expected, rtol=1e-12, atol=1e-12 * float(y.norm()))
        sty = st @ yt
        assert geq(st @ y, MU1 / MU2 * (y @ y), st.norm() * y.norm() + y @ y / MU2)
        assert geq(sty, MU2 * (st @ st), st.norm() * yt.norm())
        assert geq(sty, mu3 * (yt @ yt), st.norm() * yt.norm() + yt @ yt)


def test_no_damping_when_curvature_is_ample() -> None:
    g = gen(5)
    H = spd(D, g)
    s = randn(D, g=g)
    y = torch.linalg.solve(H, s)  # s^T y = y^T H y >= mu1 y^T H y
    assert torch.equal(powell_damping_h(s, y, H, MU1), s)


def test_damping_rejects_parameters_outside_the_thesis_ranges() -> None:
    s, H = torch.ones(D, dtype=F64), torch.eye(D, dtype=F64)
    with pytest.raises(ValueError):
        double_damping(s, s, H, MU1, 1.5)  # DD needs mu2 in (0, 1]
    with pytest.raises(ValueError):
        powell_lm_damping(s, s, H, 1.0, MU2)
    with pytest.raises(ValueError):
        powell_identity_lm_damping(s, s, MU1, 0.0)


@pytest.mark.parametrize("algorithm", ["DD", "DP_DLM", "DPI_DLM"])
def test_damped_bfgs_stays_symmetric_positive_definite(algorithm: str) -> None:
    """50 BFGS updates with damped adversarial and random pairs: H stays finite, symmetric, positive definite,
    and an L-BFGS matrix fed the same pairs does too."""
    g = gen(6)
    H = torch.eye(D, dtype=F64) / MU2
    lbfgs = LBFGSMatrix(7, 1 / MU2)
    pairs = adversarial_pairs(g) + [(randn(D, g=g), randn(D, g=g)) for _ in range(10)]
    for step in range(50):
        s, y = pairs[step % len(pairs)]
        if algorithm == "DD":
            st, yt = double_damping(s, y, H, MU1, MU2)
        elif algorithm == "DP_DLM":
            st, yt = powell_lm_damping(s, y, H, MU1, MU2)
        else:
            st, yt = powell_identity_lm_damping(s, y, MU1, MU2)
        H = bfgs_update(H, st, yt)
        lbfgs.push(st, yt)
        assert torch.isfinite(H).all() and torch.equal(H, H.T)
        assert torch.linalg.eigvalsh(H).min() > 0
    dense = lbfgs.to_dense(D)
    torch.testing.assert_close(dense, dense.T, rtol=1e-9, atol=1e-9)
    assert torch.linalg.eigvalsh((dense + dense.T) / 2).min() > 0
