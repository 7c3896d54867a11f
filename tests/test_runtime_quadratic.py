"""Losses, their output curvature, sampled Fisher targets and the exact-F quadratic model, against dense maths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kronograph import KronographError
from kronograph.runtime.losses import LOSSES, get_loss
from kronograph.runtime.quadratic import fisher_gram, inner, solve_quadratic_model


@pytest.fixture(autouse=True)
def float64():
    """Dense comparisons in double precision; the default is restored for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _targets(name: str, outputs: torch.Tensor) -> torch.Tensor:
    if name == "cross_entropy":
        return torch.randint(0, outputs.shape[-1], outputs.shape[:-1])
    if name == "sigmoid_cross_entropy":
        return torch.rand(outputs.shape)
    return torch.randn(outputs.shape)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
def test_curvature_is_the_hessian_of_the_per_example_loss(name, shape):
    torch.manual_seed(0)
    loss = get_loss(name)
    outputs, u, v = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    targets = _targets(name, outputs)
    got = loss.curvature(outputs, u, v)
    for i in range(shape[0]):
        hessian = torch.autograd.functional.hessian(
            lambda s: loss.per_example(s.unsqueeze(0), targets[i : i + 1])[0], outputs[i]
        ).reshape(u[i].numel(), -1)
        assert torch.allclose(got[i], u[i].reshape(-1) @ hessian @ v[i].reshape(-1), atol=1e-10)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", [(4,), (3, 4)])
def test_sampled_targets_give_the_fisher_in_expectation(name, shape):
    """E[q q^T] = H for q the per-example gradient of the statistics loss under sampled targets."""
    torch.manual_seed(1)
    loss = get_loss(name)
    single = torch.randn(shape)
    samples = 40000
    outputs = single.expand(samples, *shape).clone().requires_grad_(True)
    targets = loss.sample_targets(outputs)
    (grad,) = torch.autograd.grad(loss.statistics_loss(outputs, targets), outputs)
    q = (grad * samples).reshape(samples, -1)
    second_moment = q.T @ q / samples
    flat = single.reshape(-1)
    hessian = torch.autograd.functional.hessian(
        lambda s: loss.per_example(s.reshape(1, *shape), targets[:1])[0], flat
    )
    assert torch.allclose(second_moment, hessian, atol=0.03 * float(hessian.abs().max()) + 1e-3)


def test_bad_targets_are_named():
    outputs = torch.randn(4, 3)
    with pytest.raises(KronographError, match=r"labels must lie in \[0, 2\]"):
        get_loss("cross_entropy").check_targets(outputs, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(KronographError, match="integer class labels"):
        get_loss("cross_entropy").check_targets(outputs, torch.zeros(4))
    with pytest.raises(KronographError, match=r"in \[0, 1\]"):
        get_loss("sigmoid_cross_entropy").check_targets(outputs, torch.full((4, 3), 2.0))
    with pytest.raises(KronographError, match="NaN"):
        get_loss("mse").check_targets(outputs, torch.full((4, 3), float("nan")))
    with pytest.raises(KronographError, match="do not match"):
        get_loss("mse").check_targets(outputs, torch.zeros(4, 2))
    with pytest.raises(KronographError, match="unknown loss"):
        get_loss("hinge")


@pytest.mark.parametrize("name", list(LOSSES))
def test_fisher_gram_equals_the_dense_fisher(name):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(5, 3)
    loss = get_loss(name)
    params = dict(model.named_parameters())
    directions = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(2)]
    gram = fisher_gram(model, params, (x,), loss, directions)

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    shapes = [(k, p.shape) for k, p in params.items()]

    def outputs_of(theta: torch.Tensor) -> torch.Tensor:
        values, offset = {}, 0
        for key, shape in shapes:
            size = shape.numel()
            values[key] = theta[offset : offset + size].reshape(shape)
            offset += size
        return torch.func.functional_call(model, values, (x,))

    jacobian = torch.autograd.functional.jacobian(outputs_of, flat)  # [n, out, P]
    outputs = outputs_of(flat).detach()
    targets = _targets(name, outputs)
    fisher = torch.zeros(flat.numel(), flat.numel())
    for i in range(x.shape[0]):
        hessian = torch.autograd.functional.hessian(lambda s: loss.per_example(s[None], targets[i : i + 1])[0], outputs[i])
        fisher += jacobian[i].T @ hessian @ jacobian[i]
    fisher /= x.shape[0]
    vectors = [torch.cat([d[k].reshape(-1) for k in params]) for d in directions]
    for a in range(2):
        for b in range(2):
            assert torch.allclose(gram[a, b], vectors[a] @ fisher @ vectors[b], atol=1e-10)


def test_fisher_gram_leaves_batch_norm_statistics_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    before = model[1].running_mean.clone()
    params = dict(model.named_parameters())
    fisher_gram(model, params, (torch.randn(6, 3),), get_loss("mse"), [{k: torch.ones_like(v) for k, v in params.items()}])
    assert torch.equal(model[1].running_mean, before)


def test_quadratic_model_minimiser():
    torch.manual_seed(3)
    basis = torch.randn(6, 2)
    curvature = torch.randn(6, 6)
    curvature = curvature @ curvature.T
    grad = torch.randn(6)
    damping = 0.3
    gram_f, gram_i, g = basis.T @ curvature @ basis, basis.T @ basis, basis.T @ grad
    solution = solve_quadratic_model(gram_f, gram_i, g, damping)
    c = torch.tensor(solution.coefficients)
    delta = basis @ c
    # The model's gradient along both directions vanishes at the minimiser ...
    model_gradient = basis.T @ ((curvature + damping * torch.eye(6)) @ delta + grad)
    assert torch.allclose(model_gradient, torch.zeros(2), atol=1e-10)
    # ... and the reported decrease is M(delta) - M(0).
    value = 0.5 * delta @ (curvature + damping * torch.eye(6)) @ delta + grad @ delta
    assert solution.decrease == pytest.approx(float(value), abs=1e-12)


def test_quadratic_model_without_previous_update_is_the_paper_alpha():
    torch.manual_seed(4)
    fisher = torch.randn(5, 5)
    fisher = fisher @ fisher.T
    delta, grad, damping = torch.randn(5), torch.randn(5), 0.7
    zero = torch.zeros(5)
    vectors = [delta, zero]
    gram_f = torch.tensor([[u @ fisher @ v for v in vectors] for u in vectors])
    gram_i = torch.tensor([[u @ v for v in vectors] for u in vectors])
    solution = solve_quadratic_model(gram_f, gram_i, torch.stack([grad @ delta, grad @ zero]), damping)
    alpha = -(grad @ delta) / (delta @ fisher @ delta + damping * delta @ delta)
    assert solution.coefficients[0] == pytest.approx(float(alpha), rel=1e-12)
    assert solution.coefficients[1] == 0.0


def test_inner():
    x = {"a": torch.ones(2, 2), "b": torch.ones(3)}
    y = {"a": torch.full((2, 2), 2.0)}
    assert inner(x, y) == 8.0
