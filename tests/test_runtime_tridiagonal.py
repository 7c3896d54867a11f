"""The block-tridiagonal inverse (paper sec 4.3, App. B) against dense algebra on a tiny 3-layer chain."""

from __future__ import annotations

import pytest
import torch

from kronograph.passes.plan import ConvGeometry, Layer, Site
from kronograph.runtime.inverse import factored_inverses, precondition
from kronograph.runtime.tridiagonal import (
    TridiagonalInverse,
    TridiagonalInverseError,
    UnsupportedChainError,
    chain_factors,
)
from kronograph.runtime.wbar import unvec, vec

SITE = (Site("a", "s", ()),)
DIMS = (3, 4, 3, 2)  # layer i maps DIMS[i] -> DIMS[i + 1]


def linear(name: str, d_in: int, d_out: int, bias: bool = True) -> Layer:
    return Layer(name, "linear", f"{name}.w", f"{name}.b" if bias else None, (d_out, d_in), "out_in", d_in, d_out, SITE)


def chain(biases: tuple[bool, ...] = (True, False, True)) -> list[Layer]:
    return [linear(f"l{i}", DIMS[i], DIMS[i + 1], bias) for i, bias in enumerate(biases)]


def mlp_statistics(layers: list[Layer], n: int = 64, seed: int = 0) -> tuple[list[torch.Tensor], ...]:
    """Per-example inputs and pre-activation gradients of a tanh MLP with a squared loss (sum over examples)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIMS[0], dtype=torch.float64, generator=gen)
    inputs, pre = [], []
    h = x
    for i, layer in enumerate(layers):
        w = torch.randn(layer.out_features, layer.in_features, dtype=torch.float64, generator=gen)
        w = w.div(2).requires_grad_()
        b = torch.randn(layer.out_features, dtype=torch.float64, generator=gen) if layer.bias else 0.0
        inputs.append(h.detach())
        s = h @ w.T + b
        s.retain_grad()
        pre.append(s)
        h = torch.tanh(s) if i < len(layers) - 1 else s
    target = torch.randn(n, DIMS[-1], dtype=torch.float64, generator=gen)
    (0.5 * ((h - target) ** 2).sum()).backward()
    return inputs, [s.grad for s in pre]


def grads_for(layers: list[Layer], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(layer.g_dim, layer.a_dim, dtype=torch.float64, generator=gen) for layer in layers]


def damped(a: torch.Tensor, g: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    pi = torch.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    return a + pi * gamma * torch.eye(a.shape[0], dtype=a.dtype), g + gamma / pi * torch.eye(g.shape[0], dtype=g.dtype)


def dense_tridiagonal_inverse(
    a_diag: list[torch.Tensor],
    g_diag: list[torch.Tensor],
    a_cross: list[torch.Tensor],
    g_cross: list[torch.Tensor],
    gamma: float,
) -> torch.Tensor:
    """F̂^{-1} = Xi^T Lambda Xi straight from sec 4.3 on dense Kronecker blocks (damped diagonal factors)."""
    count = len(a_diag)
    pairs = [damped(a, g, gamma) for a, g in zip(a_diag, g_diag)]
    diag = [torch.kron(a, g) for a, g in pairs]
    off = [torch.kron(a_cross[i], g_cross[i]) for i in range(count - 1)]
    psi = [torch.linalg.solve(diag[i + 1], off[i].T).T for i in range(count - 1)]  # F_{i,i+1} F_{i+1,i+1}^-1
    sigma = [diag[i] - psi[i] @ diag[i + 1] @ psi[i].T for i in range(count - 1)] + [diag[-1]]
    sizes = [d.shape[0] for d in diag]
    offsets = [sum(sizes[:i]) for i in range(count)]
    xi = torch.eye(sum(sizes), dtype=torch.float64)
    for i in range(count - 1):
        xi[offsets[i] : offsets[i] + sizes[i], offsets[i + 1] : offsets[i + 1] + sizes[i + 1]] = -psi[i]
    lam = torch.block_diag(*[torch.linalg.inv(s) for s in sigma])
    return xi.T @ lam @ xi


def dense_fisher(a_joint: list[list[torch.Tensor]], g_joint: list[list[torch.Tensor]]) -> torch.Tensor:
    """F̆ with every block A_{i,j} kron G_{i,j} (not only the tridiagonal ones)."""
    count = len(a_joint)
    rows = [torch.cat([torch.kron(a_joint[i][j], g_joint[i][j]) for j in range(count)], 1) for i in range(count)]
    return torch.cat(rows)


def stacked_vec(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([vec(g[None]) for g in grads])


def split_unvec(v: torch.Tensor, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for g in grads:
        size = g.numel()
        out.append(unvec(v[start : start + size], 1, g.shape[0], g.shape[1])[0])
        start += size
    return out


@pytest.mark.parametrize("gamma", [0.0, 1e-2, 0.3])
def test_apply_equals_the_dense_formula_of_the_paper(gamma: float) -> None:
    layers = chain()
    inputs, gs = mlp_statistics(layers)
    factors = chain_factors(layers, inputs, gs)
    inverse = TridiagonalInverse(*factors, gamma, names=[layer.name for layer in layers])
    grads = grads_for(layers)
    dense = dense_tridiagonal_inverse(*factors, gamma)
    expected = split_unvec(dense @ stacked_vec(grads), grads)
    for got, want in zip(inverse.apply(grads), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(inverse.to_dense(), dense, rtol=1e-9, atol=1e-9)
    # F̂ agrees with the damped F̆ on the tridiagonal blocks (its definition); one-group shapes pass through
    f_hat = torch.linalg.inv(inverse.to_dense())
    sizes = [layer.a_dim * layer.g_dim for layer in layers]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    a_diag, g_diag, a_cross, g_cross = factors
    for i in range(len(layers)):
        block = f_hat[offsets[i] : offsets[i] + sizes[i], offsets[i] : offsets[i] + sizes[i]]
        torch.testing.assert_close(block, torch.kron(*damped(a_diag[i], g_diag[i], gamma)), rtol=1e-7, atol=1e-9)
        if i + 1 < len(layers):
            block = f_hat[offsets[i] : offsets[i] + sizes[i], offsets[i + 1] : offsets[i + 1] + sizes[i + 1]]
            torch.testing.assert_close(block, torch.kron(a_cross[i], g_cross[i]), rtol=1e-7, atol=1e-9)
    batched = inverse.apply([g[None] for g in grads])
    assert [tuple(x.shape) for x in batched] == [(1, *g.shape) for g in grads]


def markov_joint(dims: list[int], gen: torch.Generator) -> list[list[torch.Tensor]]:
    """Joint covariance blocks of a Gaussian chain x_i = M_i x_{i-1} + e_i (Markov: its inverse is tridiagonal)."""
    count = len(dims)
    cov = [[None] * count for _ in range(count)]
    root = torch.randn(dims[0], dims[0], dtype=torch.float64, generator=gen)
    cov[0][0] = root @ root.T + 0.5 * torch.eye(dims[0], dtype=torch.float64)
    for i in range(1, count):
        m = torch.randn(dims[i], dims[i - 1], dtype=torch.float64, generator=gen) / 2
        noise = torch.randn(dims[i], dims[i], dtype=torch.float64, generator=gen)
        jitter = noise @ noise.T / dims[i] + 0.2 * torch.eye(dims[i], dtype=torch.float64)
        cov[i][i] = m @ cov[i - 1][i - 1] @ m.T + jitter
        for j in range(i):  # Cov(x_j, x_i) = Cov(x_j, x_{i-1}) M_i^T
            cov[j][i] = cov[j][i - 1] @ m.T
            cov[i][j] = cov[j][i].T
    return cov


def test_exact_when_the_fisher_is_a_directed_gaussian_chain() -> None:
    layers = chain()
    gen = torch.Generator().manual_seed(3)
    a_joint = markov_joint([layer.a_dim for layer in layers], gen)
    g_joint = markov_joint([layer.g_dim for layer in layers], gen)
    fisher = dense_fisher(a_joint, g_joint)
    inverse = TridiagonalInverse(
        [a_joint[i][i] for i in range(3)],
        [g_joint[i][i] for i in range(3)],
        [a_joint[i][i + 1] for i in range(2)],
        [g_joint[i][i + 1] for i in range(2)],
        0.0,
    )
    exact = torch.linalg.inv(fisher)
    torch.testing.assert_close(inverse.to_dense(), exact, rtol=1e-9, atol=1e-9)
    grads = grads_for(layers, seed=4)
    expected = split_unvec(torch.linalg.solve(fisher, stacked_vec(grads)), grads)
    for got, want in zip(inverse.apply(grads), expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_zero_cross_moments_give_the_block_diagonal_damped_solve() -> None:
    layers = chain()
    inputs, gs = mlp_statistics(layers, seed=5)
    a_diag, g_diag, a_cross, g_cross = chain_factors(layers, inputs, gs)
    gamma = 0.05
    zeros_a, zeros_g = [torch.zeros_like(x) for x in a_cross], [torch.zeros_like(x) for x in g_cross]
    inverse = TridiagonalInverse(a_diag, g_diag, zeros_a, zeros_g, gamma)
    grads = grads_for(layers, seed=6)
    for got, a, g, grad in zip(inverse.apply(grads), a_diag, g_diag, grads):
        want = precondition(grad[None], factored_inverses(a[None], g[None], gamma))[0]
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_chain_factors_are_the_per_example_moments() -> None:
    layers = chain((True, False, True))
    inputs, gs = mlp_statistics(layers, n=10, seed=7)
    a_diag, g_diag, a_cross, g_cross = chain_factors(layers, inputs, gs, grad_scale=2.0)
    bar0 = torch.cat([inputs[0], torch.ones(10, 1, dtype=torch.float64)], 1)
    bar1 = inputs[1]  # layer l1 has no bias: no homogeneous coordinate
    torch.testing.assert_close(a_cross[0], bar0.T @ bar1 / 10)
    torch.testing.assert_close(a_diag[0], bar0.T @ bar0 / 10)
    torch.testing.assert_close(g_cross[1], 4.0 * gs[1].T @ gs[2] / 10)
    assert a_cross[1].shape == (layers[1].a_dim, layers[2].a_dim) and g_diag[2].shape == (2, 2)


def test_convolutions_are_refused_by_name() -> None:
    geometry = ConvGeometry((1,), (1,), (0, 0), (1,), 1)
    conv = Layer("conv", "conv1d", "w", None, (4, 3, 1), "out_in", 3, 4, SITE, geometry)
    layers = [conv, linear("head", 4, 2)]
    x, g = torch.zeros(5, 3), torch.zeros(5, 4)
    with pytest.raises(UnsupportedChainError, match="'conv'"):
        chain_factors(layers, [x, torch.zeros(5, 4)], [g, torch.zeros(5, 2)])


def test_non_finite_or_inconsistent_statistics_raise_instead_of_nan() -> None:
    layers = chain()
    inputs, gs = mlp_statistics(layers, seed=8)
    a_diag, g_diag, a_cross, g_cross = chain_factors(layers, inputs, gs)
    poisoned = [x.clone() for x in g_cross]
    poisoned[1][0, 0] = float("nan")
    with pytest.raises(TridiagonalInverseError, match="G_cross of layers '1', '2'"):
        TridiagonalInverse(a_diag, g_diag, a_cross, poisoned, 0.1)
    # cross-moments far larger than the diagonal factors allow: Sigma is not positive definite
    with pytest.raises(TridiagonalInverseError, match="not positive definite"):
        TridiagonalInverse(a_diag, g_diag, [10 * x for x in a_cross], [10 * x for x in g_cross], 1e-3)
    inverse = TridiagonalInverse(a_diag, g_diag, a_cross, g_cross, 0.1)
    grads = grads_for(layers)
    grads[2][0, 0] = float("inf")
    with pytest.raises(TridiagonalInverseError, match="gradient"):
        inverse.apply(grads)


def test_float32_application_stays_close_to_float64() -> None:
    layers = chain()
    inputs, gs = mlp_statistics(layers, seed=9)
    factors = chain_factors(layers, inputs, gs, dtype=torch.float32)
    grads = grads_for(layers)
    low = TridiagonalInverse(*factors, 0.05).apply([g.float() for g in grads])
    high = TridiagonalInverse(*[[x.double() for x in f] for f in factors], 0.05).apply(grads)
    assert all(x.dtype == torch.float32 and bool(torch.isfinite(x).all()) for x in low)
    for x, y in zip(low, high):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-4)
