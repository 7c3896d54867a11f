"""Damped Kronecker inverses against dense algebra, NaN safety, pi, W_bar round trips and the EMA."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from kronograph.passes.plan import ConvGeometry, Layer, Site
from kronograph.runtime.blocks import KroneckerBlock
from kronograph.runtime.factors import ema_, paper_decay
from kronograph.runtime.inverse import InverseWarning, StatisticsWarning, trace_pi
from kronograph.runtime.wbar import gather, scatter, unvec, vec

SITE = (Site("a", "s", ()),)


def spd(groups: int, d: int, generator: torch.Generator) -> torch.Tensor:
    m = torch.randn(groups, d, 2 * d, dtype=torch.float64, generator=generator)
    return m @ m.transpose(1, 2) / d + 0.1 * torch.eye(d, dtype=torch.float64)


def grouped_linear(groups: int, out_g: int, in_g: int, bias: bool) -> Layer:
    geometry = ConvGeometry((1,), (1,), (0, 0), (1,), groups)
    shape = (groups * out_g, in_g, 1)
    return Layer("c", "conv1d", "w", "b" if bias else None, shape, "out_in", in_g, out_g, SITE, geometry)


def column_vec(matrix: torch.Tensor) -> torch.Tensor:
    return torch.stack([matrix[:, j] for j in range(matrix.shape[1])]).reshape(-1)


@pytest.mark.parametrize("groups", [1, 2])
def test_preconditioning_equals_the_dense_damped_solve(groups: int) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = grouped_linear(groups, out_g=3, in_g=4, bias=True)
    a, g = spd(groups, 5, gen), 7.0 * spd(groups, 3, gen)
    grad = torch.randn(groups, 3, 5, dtype=torch.float64, generator=gen)
    gamma = 0.3
    block = KroneckerBlock(layer, dtype=torch.float64)
    block.update_factors(a, g, decay=0.0)
    assert block.invert(gamma)
    update = block.precondition(grad)
    for k in range(groups):
        pi = math.sqrt((torch.trace(a[k]).item() / 5) / (torch.trace(g[k]).item() / 3))
        eye_a, eye_g = torch.eye(5, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
        dense = torch.kron(a[k] + pi * gamma * eye_a, g[k] + gamma / pi * eye_g)
        want = torch.linalg.solve(dense, column_vec(grad[k]))
        torch.testing.assert_close(column_vec(update[k]), want, rtol=1e-10, atol=1e-12)
    # the block's own dense forms agree with the same convention
    torch.testing.assert_close(block.to_dense(gamma) @ vec(update), vec(grad), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block.to_dense()[:15, :15], torch.kron(a[0], g[0]), rtol=0, atol=0)
    if groups == 2:
        assert block.to_dense()[:15, 15:].abs().max() == 0


def test_pi_from_traces() -> None:
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64))[None]
    g = torch.tensor([[[2.0, 1.0], [1.0, 6.0]]], dtype=torch.float64)
    assert trace_pi(a, g).item() == pytest.approx(math.sqrt((12.0 / 4) / (8.0 / 2)), rel=1e-14)
    zero = torch.zeros(1, 2, 2, dtype=torch.float64)
    assert trace_pi(a, zero).item() == 1.0  # a zero G (no gradient yet) falls back to pi = 1


def test_non_finite_factors_keep_the_previous_inverse() -> None:
    gen = torch.Generator().manual_seed(1)
    layer = grouped_linear(2, out_g=2, in_g=3, bias=False)
    block = KroneckerBlock(layer, dtype=torch.float32)
    block.update_factors(spd(2, 3, gen).float(), spd(2, 2, gen).float(), decay=0.0)
    assert block.invert(0.1)
    before = block.inverses
    block.update_factors(spd(2, 3, gen).float(), spd(2, 2, gen).float(), decay=0.0)
    block.a[1, 0, 0] = float("nan")  # as if the EMA itself had been poisoned
    with pytest.warns(InverseWarning, match=r"group\(s\) \[1\]"):
        assert not block.invert(0.1)
    assert block.inverses.failed.tolist() == [False, True]
    torch.testing.assert_close(block.inverses.a_inv[1], before.a_inv[1], rtol=0, atol=0)
    torch.testing.assert_close(block.inverses.g_inv[1], before.g_inv[1], rtol=0, atol=0)
    assert not torch.allclose(block.inverses.a_inv[0], before.a_inv[0])
    update = block.precondition(torch.randn(2, 2, 3))
    assert torch.isfinite(update).all()


def test_float32_factorisation_failure_is_retried_in_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=gen))
    a = (q @ torch.diag(torch.logspace(0, -9, 8, dtype=torch.float64)) @ q.T).float()
    a = ((a + a.T) / 2)[None]  # positive definite as stored, but float32 Cholesky breaks down
    assert torch.linalg.cholesky_ex(a)[1].item() != 0 and torch.linalg.cholesky_ex(a.double())[1].item() == 0
    block = KroneckerBlock(grouped_linear(1, out_g=2, in_g=8, bias=False), dtype=torch.float32)
    block.update_factors(a, torch.eye(2)[None], decay=0.0)
    assert block.invert(0.0)
    torch.testing.assert_close(block.inverses.a_inv, torch.linalg.inv(a.double()).float(), rtol=1e-5, atol=0)


def test_non_finite_statistics_are_not_folded_into_the_ema() -> None:
    block = KroneckerBlock(grouped_linear(1, out_g=2, in_g=2, bias=False), dtype=torch.float64)
    block.update_factors(torch.eye(2)[None], 2 * torch.eye(2)[None], decay=0.0)
    with pytest.warns(StatisticsWarning):
        assert not block.update_factors(torch.full((1, 2, 2), float("nan")), torch.eye(2)[None], decay=0.5)
    assert block.a.tolist() == torch.eye(2)[None].tolist() and block.updates == 1


def test_failed_first_inverse_and_singular_factors_never_give_nan() -> None:
    layer = grouped_linear(1, out_g=2, in_g=2, bias=False)
    block = KroneckerBlock(layer, dtype=torch.float32)
    block.update_factors(torch.eye(2)[None], torch.eye(2)[None], decay=0.0)
    block.a.fill_(float("inf"))
    with pytest.warns(InverseWarning):
        assert not block.invert(0.5)
    assert torch.isfinite(block.inverses.a_inv).all() and torch.isfinite(block.inverses.g_inv).all()
    # rank-deficient factors without damping: Cholesky fails in float32 and float64; previous kept
    block.update_factors(torch.eye(2)[None], torch.eye(2)[None], decay=0.0)
    assert block.invert(0.0)
    good = block.inverses.a_inv.clone()
    block.update_factors(torch.ones(1, 2, 2), torch.eye(2)[None], decay=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not block.invert(0.0)
    assert any(issubclass(w.category, InverseWarning) for w in caught)
    torch.testing.assert_close(block.inverses.a_inv, good, rtol=0, atol=0)


@pytest.mark.parametrize(
    "layer",
    [
        Layer("l", "linear", "w", "b", (3, 4), "out_in", 4, 3, SITE),
        Layer("l", "linear", "w", None, (4, 3), "in_out", 4, 3, SITE),
        Layer(
            "c", "conv2d", "w", "b", (6, 2, 2, 3), "out_in", 12, 3, SITE,
            ConvGeometry((2, 3), (1, 1), (0,) * 4, (1, 1), 2),
        ),
    ],
    ids=["linear", "in_out", "grouped conv"],
)
def test_gather_and_scatter_are_inverse(layer: Layer) -> None:
    weight = torch.randn(layer.weight_shape, dtype=torch.float64)
    bias = torch.randn(layer.groups * layer.out_features, dtype=torch.float64) if layer.bias else None
    w_bar = gather(layer, weight, bias)
    assert w_bar.shape == (layer.groups, layer.out_features, layer.a_dim)
    # [out, in] order: row r of group k is output unit k*out_g + r, its last column the bias
    out_in = weight.T if layer.weight_layout == "in_out" else weight.reshape(weight.shape[0], -1)
    torch.testing.assert_close(w_bar[-1, -1, : layer.in_features], out_in[-1], rtol=0, atol=0)
    if bias is not None:
        assert w_bar[-1, -1, -1] == bias[-1]
    back_w, back_b = scatter(layer, w_bar)
    torch.testing.assert_close(back_w, weight, rtol=0, atol=0)
    if bias is not None:
        torch.testing.assert_close(back_b, bias, rtol=0, atol=0)
    torch.testing.assert_close(unvec(vec(w_bar), layer.groups, layer.out_features, layer.a_dim), w_bar, rtol=0, atol=0)


def test_ema_and_paper_schedule() -> None:
    assert [paper_decay(k) for k in (1, 2, 10, 20, 1000)] == [0.0, 0.5, 0.9, 0.95, 0.95]
    old = torch.tensor([1.0, 2.0], dtype=torch.float64)
    new = ema_(old, torch.tensor([3.0, 6.0], dtype=torch.float64), 0.75)
    assert new is old and new.tolist() == [1.5, 3.0]
    first = torch.ones(2)
    assert ema_(None, first, 0.9) is not first


def test_block_state_round_trip() -> None:
    gen = torch.Generator().manual_seed(2)
    layer = grouped_linear(2, out_g=2, in_g=3, bias=True)
    block = KroneckerBlock(layer, dtype=torch.float64)
    block.update_factors(spd(2, 4, gen), spd(2, 2, gen), decay=0.0)
    block.invert(0.2)
    other = KroneckerBlock(layer, dtype=torch.float64)
    other.load_state_dict(block.state_dict())
    grad = torch.randn(2, 2, 4, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(other.precondition(grad), block.precondition(grad), rtol=0, atol=0)


def _homogeneous_factor(x: torch.Tensor, locations: float = 1.0) -> torch.Tensor:
    """A = locations * mean_i [x_i; 1][x_i; 1]^T as [1, d + 1, d + 1] (a conv's A carries T on its 1-entry)."""
    bar = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return (locations * bar.T @ bar / len(x))[None]


@pytest.mark.parametrize("locations", [1.0, 9.0])
def test_centered_damped_inverse_is_the_dense_inverse_with_damping_in_centred_coordinates(locations):
    from kronograph.runtime.inverse import centered_damped_inverse, centered_trace, input_mean

    torch.manual_seed(0)
    x = 0.5 + 0.05 * torch.randn(40, 6, dtype=torch.float64)  # sigmoid-like units: mean 1/2, small spread
    a = _homogeneous_factor(x, locations)
    mu = input_mean(a)
    assert torch.allclose(mu[0], x.mean(0), atol=1e-12)
    centred = x - x.mean(0)
    covariance = locations * centred.T @ centred / len(x)
    assert float(centered_trace(a, mu)[0]) == pytest.approx(float(covariance.trace()) + locations, rel=1e-12)
    t = torch.eye(7, dtype=torch.float64)
    t[:-1, -1] = x.mean(0)
    want = torch.linalg.inv(a[0] + 0.3 * t @ t.T)
    inverse, failed = centered_damped_inverse(a, mu, 0.3)
    assert not failed.any()
    assert torch.allclose(inverse[0], want, rtol=1e-9, atol=1e-9)
    # the covariance in blocks of 3 (formed block by block): the dense inverse of T (B + 0.3 I) T^T, B the
    # covariance's block-diagonal part beside the homogeneous entry
    inner = torch.zeros(7, 7, dtype=torch.float64)
    inner[:-1, :-1] = _dense_block_diagonal(covariance, [3, 3])
    inner[-1, -1] = locations
    blocked, failed = centered_damped_inverse(a, mu, 0.3, max_dim=3)
    assert not failed.any()
    assert torch.allclose(blocked[0], torch.linalg.inv(t @ (inner + 0.3 * torch.eye(7, dtype=torch.float64)) @ t.T),
                          rtol=1e-9, atol=1e-9)


def test_centered_damping_keeps_kfac_invariant_to_a_shift_of_the_inputs():
    """Paper sec 10: K-FAC is invariant to centring the inputs, but Tikhonov damping of [W b] is not. Shift
    the inputs by v (and the bias by -W v: same outputs); the damped step must change the outputs the same,
    i.e. Delta W' = Delta W and Delta b' = Delta b - Delta W v. Holds with centred damping, not without."""
    from kronograph.runtime.inverse import factored_inverses, precondition

    torch.manual_seed(1)
    x = torch.randn(50, 4, dtype=torch.float64)
    shift = torch.tensor([3.0, -2.0, 0.5, 1.0], dtype=torch.float64)
    g_rows = torch.randn(50, 3, dtype=torch.float64)
    g = (g_rows.T @ g_rows / 50)[None]
    grad_w, grad_b = g_rows.T @ x / 50, g_rows.mean(0)
    steps = {}
    for centered in (True, False):
        for name, inputs, gw in (("plain", x, grad_w), ("shifted", x + shift, grad_w + grad_b[:, None] * shift)):
            inverses = factored_inverses(_homogeneous_factor(inputs), g, 0.2, centered=centered)
            steps[centered, name] = precondition(torch.cat([gw, grad_b[:, None]], 1)[None], inverses)[0]
    for centered in (True, False):
        plain, shifted = steps[centered, "plain"], steps[centered, "shifted"]
        same = (torch.allclose(shifted[:, :-1], plain[:, :-1], atol=1e-10)
                and torch.allclose(shifted[:, -1], plain[:, -1] - plain[:, :-1] @ shift, atol=1e-10))
        assert same == centered


def test_a_factors_damping_never_falls_below_its_floor_against_dense_inverses():
    """With ``floor`` each factor is damped by max(pi gamma, floor tr A / dim A) and max(gamma / pi, floor tr G /
    dim G), per group; a damping above the floor is left as it is. Checked against dense inverses of
    the damped factors, float64, with pi from the traces."""
    from kronograph.runtime.inverse import factored_inverses

    generator = torch.Generator().manual_seed(3)
    a, g = spd(2, 5, generator), spd(2, 3, generator)
    g[1] *= 1e-6  # one group's G at another scale: its floor is its own
    for gamma in (1e-9, 10.0):
        inverses = factored_inverses(a, g, gamma, floor=1e-3)
        for k in range(2):
            mean_a, mean_g = float(a[k].trace()) / 5, float(g[k].trace()) / 3
            pi = math.sqrt(mean_a / mean_g)
            damp_a, damp_g = max(pi * gamma, 1e-3 * mean_a), max(gamma / pi, 1e-3 * mean_g)
            assert torch.allclose(inverses.a_inv[k], torch.linalg.inv(a[k] + damp_a * torch.eye(5, dtype=a.dtype)),
                                  rtol=1e-9, atol=0)
            assert torch.allclose(inverses.g_inv[k], torch.linalg.inv(g[k] + damp_g * torch.eye(3, dtype=g.dtype)),
                                  rtol=1e-9, atol=0)
    unfloored = factored_inverses(a, g, 10.0)
    assert torch.equal(unfloored.a_inv, factored_inverses(a, g, 10.0, floor=1e-3).a_inv)  # above it: untouched


def test_the_floor_keeps_a_singular_output_factor_invertible_in_float32():
    """A softmax output layer's G has an exact null vector (the ones: each row of p - onehot sums to 0), which
    float32 rounding turns slightly negative; with gamma at 1e-12 of its scale its Cholesky fails (the previous
    inverse is kept, with a warning), the floor keeps it positive definite."""
    from kronograph.runtime.inverse import factored_inverses

    torch.manual_seed(0)
    logits = torch.randn(500, 10) * 3
    rows = torch.softmax(logits, 1) - torch.nn.functional.one_hot(torch.randint(0, 10, (500,)), 10).float()
    g = (rows.T @ rows / 500)[None]
    x = torch.randn(500, 6)
    a = (x.T @ x / 500)[None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factored_inverses(a, g, 1e-12 * float(g.diagonal(dim1=1, dim2=2).mean()))
        assert any(issubclass(w.category, InverseWarning) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InverseWarning)
        inverses = factored_inverses(a, g, 1e-12 * float(g.diagonal(dim1=1, dim2=2).mean()), floor=1e-3)
    assert inverses.ok and torch.isfinite(inverses.g_inv).all()


def _dense_block_diagonal(m: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The block-diagonal part of a [d, d] matrix in contiguous blocks of the given widths, written out."""
    out, start = torch.zeros_like(m), 0
    for size in sizes:
        out[start:start + size, start:start + size] = m[start:start + size, start:start + size]
        start += size
    return out


@pytest.mark.parametrize("d, max_dim, want", [(11, 4, [4, 4, 3]), (10, 4, [4, 4, 2]), (1025, 1024, [513, 512]),
                                              (3137, 1024, [785, 785, 785, 782]), (9, 2, [2, 2, 2, 2, 1]),
                                              (8, 8, [8]), (8, None, [8])])
def test_a_wide_factor_is_cut_into_contiguous_blocks_no_wider_than_the_bound(d, max_dim, want):
    from kronograph.runtime.inverse import diagonal_block_sizes

    assert diagonal_block_sizes(d, max_dim) == want


@pytest.mark.parametrize("centered", [False, True])
def test_blocked_factors_precondition_as_the_dense_kronecker_of_their_block_diagonal_parts(centered):
    """With ``max_dim`` the damped solve is (B_A + pi gamma C)^-1 kron (B_G + gamma / pi I)^-1 applied to vec(grad),
    B the factors' block-diagonal parts written out densely here, pi from the whole traces; centred damping:
    B_A from the centred covariance's blocks, C = T T^T (the mean-input coordinate kept whole)."""
    from kronograph.runtime.inverse import factored_inverses, precondition

    generator = torch.Generator().manual_seed(5)
    x = 0.5 + torch.randn(60, 10, dtype=torch.float64, generator=generator)
    a = _homogeneous_factor(x)
    g = spd(1, 7, generator)
    grad = torch.randn(1, 7, 11, dtype=torch.float64, generator=generator)
    gamma = 0.05
    inverses = factored_inverses(a, g, gamma, centered=centered, max_dim=4)
    update = precondition(grad, inverses)[0]
    g_b = _dense_block_diagonal(g[0], [4, 3])
    if centered:
        t = torch.eye(11, dtype=torch.float64)
        t[:-1, -1] = x.mean(0)
        tilde = torch.linalg.solve(t, torch.linalg.solve(t, a[0]).T)[None]  # T^-1 A T^-T: [[covariance, 0], [0, 1]]
        inner = torch.zeros_like(tilde[0])
        inner[:-1, :-1] = _dense_block_diagonal(tilde[0, :-1, :-1], [4, 4, 2])
        inner[-1, -1] = tilde[0, -1, -1]
        pi = math.sqrt((float(tilde[0].trace()) / 11) / (float(g[0].trace()) / 7))
        a_b, damping = t @ inner @ t.T, pi * gamma * t @ t.T
    else:
        pi = math.sqrt((float(a[0].trace()) / 11) / (float(g[0].trace()) / 7))
        a_b, damping = _dense_block_diagonal(a[0], [4, 4, 3]), pi * gamma * torch.eye(11, dtype=torch.float64)
    assert not torch.equal(a_b, a[0])  # the blocks drop real correlations
    dense = torch.kron(a_b + damping, g_b + gamma / pi * torch.eye(7, dtype=torch.float64))
    want = torch.linalg.solve(dense, column_vec(grad[0]))
    torch.testing.assert_close(column_vec(update), want, rtol=1e-9, atol=1e-12)
    whole = precondition(grad, factored_inverses(a, g, gamma, centered=centered))[0]
    assert not torch.allclose(update, whole, rtol=1e-3)  # the bound changed the solve


def test_a_blocked_factor_with_a_non_finite_block_keeps_the_previous_inverses():
    """One NaN inside one diagonal block of one group fails that group as a whole (its previous pair is kept, with
    an InverseWarning); the other group's blocks are inverted; nothing non-finite comes out."""
    from kronograph.runtime.inverse import factored_inverses

    generator = torch.Generator().manual_seed(6)
    a, g = spd(2, 9, generator), spd(2, 3, generator)
    before = factored_inverses(a, g, 0.1, max_dim=4)
    poisoned = a.clone()
    poisoned[1, 7, 7] = float("nan")
    with pytest.warns(InverseWarning, match=r"group\(s\) \[1\]"):
        after = factored_inverses(poisoned, g, 0.3, previous=before, max_dim=4)
    assert after.failed.tolist() == [False, True]
    assert torch.equal(after.a_inv[1], before.a_inv[1]) and torch.equal(after.g_inv[1], before.g_inv[1])
    assert torch.isfinite(after.a_inv).all() and not torch.equal(after.a_inv[0], before.a_inv[0])
