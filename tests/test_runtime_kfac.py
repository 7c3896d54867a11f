"""kronograph.optim.KFAC against dense computations on a tiny model, and its contract.

The oracle below recomputes a K-FAC step from scratch: per-example activations and gradients by autograd,
the factors, the damped Kronecker system solved densely with torch.kron, the exact Fisher from the full
Jacobian, and the minimiser of the quadratic model from those explicit matrices.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import kronograph
from kronograph.runtime.damping import gamma_candidates, levenberg_marquardt

N, SIZES, CLASSES = 6, (3, 4), 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.Tanh(), nn.Linear(SIZES[1], CLASSES, bias=False)).double()


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(N, SIZES[0], generator=generator, dtype=torch.float64), torch.randint(0, CLASSES, (N,), generator=generator)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unflatten(model: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    values, offset = {}, 0
    for name, p in model.named_parameters():
        values[name] = theta[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return values


def block_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Per-layer (A, G) from per-example activations and per-example gradients dl_i/ds_i (empirical)."""
    w1, b1, w2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    s1 = (x @ w1.T + b1).requires_grad_(True)
    h = torch.tanh(s1)
    s2 = h @ w2.T
    per_example = nn.functional.cross_entropy(s2, y, reduction="none")
    g1, g2 = torch.autograd.grad(per_example.sum(), (s1, s2))  # row i is dl_i/ds_i
    a1 = torch.cat([x, torch.ones(N, 1, dtype=x.dtype)], dim=1)
    a2 = h.detach()
    return [(a1.T @ a1 / N, g1.T @ g1 / N), (a2.T @ a2 / N, g2.T @ g2 / N)]


def damped_solve(a: torch.Tensor, g: torch.Tensor, grad_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """(A + pi gamma I)^-1 kron (G + gamma/pi I)^-1 applied to vec(grad_bar), vec stacking columns."""
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    matrix = torch.kron(a + pi * gamma * torch.eye(a.shape[0], dtype=a.dtype), g + gamma / pi * torch.eye(g.shape[0], dtype=g.dtype))
    solved = torch.linalg.solve(matrix, grad_bar.T.reshape(-1))
    return solved.reshape(grad_bar.shape[1], grad_bar.shape[0]).T


def exact_fisher(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    theta = flat_params(model)
    jacobian = torch.autograd.functional.jacobian(lambda t: torch.func.functional_call(model, unflatten(model, t), (x,)), theta)
    p = torch.softmax(torch.func.functional_call(model, unflatten(model, theta), (x,)), dim=1).detach()
    fisher = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for i in range(N):
        fisher += jacobian[i].T @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ jacobian[i]
    return fisher / N


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eta: float) -> torch.Tensor:
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]) + eta * flat_params(model)


def proposal(factors, grad: torch.Tensor, gamma: float) -> torch.Tensor:
    w1_size, b1_size = SIZES[1] * SIZES[0], SIZES[1]
    grad_w1, grad_b1 = grad[:w1_size].reshape(SIZES[1], SIZES[0]), grad[w1_size : w1_size + b1_size]
    grad_w2 = grad[w1_size + b1_size :].reshape(CLASSES, SIZES[1])
    u1 = damped_solve(*factors[0], torch.cat([grad_w1, grad_b1[:, None]], dim=1), gamma)
    u2 = damped_solve(*factors[1], grad_w2, gamma)
    return -torch.cat([u1[:, :-1].reshape(-1), u1[:, -1], u2.reshape(-1)])


SETTINGS = dict(
    fisher="empirical", stats_fraction=1.0, qmodel_fraction=1.0, damping=0.5, factor_damping=0.3,
    weight_decay=0.01, adapt_damping=False, adapt_gamma=False, factor_dtype=torch.float64, seed=0,
    centered_damping=False,  # the dense oracle below is the paper's Tikhonov damping of [W b]
    max_momentum=None,  # and the paper's free 2x2 system of sec 7
)


def test_two_steps_equal_the_dense_algorithm():
    model = make_model()
    reference = copy.deepcopy(model)
    x, y = data()
    optimizer = kronograph.optim.KFAC(kronograph.compile(model, (x,), loss="cross_entropy"), **SETTINGS)
    lam, gamma, eta = 0.5, 0.3, 0.01

    # Step 1: alpha alone (no previous update); the factors are the batch's.
    factors = block_factors(reference, x, y)
    grad = gradient(reference, x, y, eta)
    delta = proposal(factors, grad, gamma)
    fisher = exact_fisher(reference, x)
    alpha = -(grad @ delta) / (delta @ fisher @ delta + (lam + eta) * delta @ delta)
    info = optimizer.step(x, y)
    assert info["alpha"] == pytest.approx(float(alpha), rel=1e-9)
    theta = flat_params(reference) + alpha * delta
    assert torch.allclose(flat_params(model), theta, atol=1e-12)

    # Step 2 on another batch: EMA with decay 1/2, then alpha and mu from the 2x2 system of sec 7.
    with torch.no_grad():
        for p, value in zip(reference.parameters(), unflatten(reference, theta).values()):
            p.copy_(value)
    previous = alpha * delta
    x2, y2 = data(seed=2)
    new = block_factors(reference, x2, y2)
    factors = [(0.5 * a + 0.5 * a2, 0.5 * g + 0.5 * g2) for (a, g), (a2, g2) in zip(factors, new)]
    grad = gradient(reference, x2, y2, eta)
    delta = proposal(factors, grad, gamma)
    fisher = exact_fisher(reference, x2)
    vectors = [delta, previous]
    system = torch.tensor([[u @ fisher @ v + (lam + eta) * u @ v for v in vectors] for u in vectors])
    alpha, mu = (-torch.linalg.solve(system, torch.stack([grad @ delta, grad @ previous]))).tolist()
    info = optimizer.step(x2, y2)
    assert info["alpha"] == pytest.approx(alpha, rel=1e-8)
    assert info["mu"] == pytest.approx(mu, rel=1e-8)
    assert torch.allclose(flat_params(model), theta + alpha * delta + mu * previous, atol=1e-12)


def test_levenberg_marquardt_rule():
    omega = (19 / 20) ** 5
    assert levenberg_marquardt(10.0, 0.9, omega) == pytest.approx(10.0 * omega)  # model trustworthy: shrink
    assert levenberg_marquardt(10.0, 0.1, omega) == pytest.approx(10.0 / omega)  # model too optimistic: grow
    assert levenberg_marquardt(10.0, 0.5, omega) == 10.0
    assert levenberg_marquardt(1e-9, 0.9, omega, minimum=1e-8) == 1e-8
    assert gamma_candidates(2.0, 20) == pytest.approx([2.0, 2.0 * math.sqrt(19 / 20) ** 20, 2.0 / math.sqrt(19 / 20) ** 20])


def test_lambda_follows_rho_on_a_real_step():
    """Where the quadratic model is trustworthy (rho > 3/4), lambda shrinks by omega1 after the step."""
    model = make_model()
    x, y = data()
    optimizer = kronograph.optim.KFAC(
        kronograph.compile(model, (x,)), **{**SETTINGS, "adapt_damping": True, "damping": 10.0}, damping_every=1
    )
    info = optimizer.step(x, y)
    assert info["rho"] > 0.75
    assert optimizer.damping == pytest.approx(10.0 * 19 / 20)


def test_gamma_is_the_best_of_three_candidates():
    model = make_model()
    x, y = data()
    settings = {**SETTINGS, "inverse_every": 1}
    optimizer = kronograph.optim.KFAC(kronograph.compile(model, (x,)), **{**settings, "adapt_gamma": True}, gamma_every=2)
    optimizer.step(x, y)
    state, weights = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(model.state_dict())
    x2, y2 = data(seed=3)
    decreases = {}
    for candidate in gamma_candidates(optimizer.gamma, 2):
        other = make_model()
        other.load_state_dict(weights)
        fixed = kronograph.optim.KFAC(kronograph.compile(other, (x,)), **{**settings, "factor_damping": candidate})
        fixed.load_state_dict(copy.deepcopy(state))
        fixed.gamma = candidate
        decreases[candidate] = fixed.step(x2, y2)["model_decrease"]
    info = optimizer.step(x2, y2)
    best = min(decreases, key=decreases.get)
    assert info["factor_damping"] == pytest.approx(best)
    assert info["model_decrease"] == pytest.approx(decreases[best], rel=1e-9)


def test_parameters_are_updated_in_place_and_resume_is_exact():
    def run(steps, state=None):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
        compiled = kronograph.compile(model, torch.randn(2, 1, 6, 6))
        optimizer = kronograph.optim.KFAC(compiled, seed=7, inverse_every=2, gamma_every=2, damping_every=1)
        if state is not None:
            model.load_state_dict(state[0])
            optimizer.load_state_dict(state[1])
        generator = torch.Generator().manual_seed(11)
        batches = [(torch.randn(16, 1, 6, 6, generator=generator), torch.randint(0, 4, (16,), generator=generator)) for _ in range(6)]
        losses = [optimizer.step(*batch)["loss"] for batch in batches[optimizer.steps : steps]]
        return model, optimizer, losses

    torch.manual_seed(5)
    initial = nn.Conv2d(1, 3, 3, padding=1).weight.detach().clone()  # the same draw as run()'s first layer
    model, optimizer, losses = run(6)
    weight = model[0].weight
    assert weight is dict(model.named_parameters())["0.weight"]  # the module's own Parameter, moved in place
    assert not torch.equal(weight.detach(), initial) and len(losses) == 6
    half_model, half_optimizer, _ = run(3)
    state = (copy.deepcopy(half_model.state_dict()), copy.deepcopy(half_optimizer.state_dict()))
    resumed_model, _, resumed_losses = run(6, state)
    assert resumed_losses == losses[3:]
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key


def test_non_finite_batch_never_reaches_the_weights():
    model = make_model()
    x, y = data()
    optimizer = kronograph.optim.KFAC(kronograph.compile(model, (x,)), **SETTINGS)
    optimizer.step(x, y)
    before = flat_params(model)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning):
        info = optimizer.step(bad, y)
    assert "skipped" in info
    assert torch.equal(flat_params(model), before)
    info = optimizer.step(x, y)  # and training goes on
    assert "skipped" not in info and math.isfinite(info["loss"])


def test_bad_arguments_are_named():
    compiled = kronograph.compile(nn.Linear(3, 2), torch.randn(2, 3))
    for kwargs, message in [
        ({"fisher": "exact"}, "fisher"),
        ({"momentum": "qmodel", "rescale": False}, "rescale"),
        ({"stats_fraction": 0.0}, "stats_fraction"),
        ({"inverse_every": 0}, "inverse_every"),
    ]:
        with pytest.raises(kronograph.KronographError, match=message):
            kronograph.optim.KFAC(compiled, **kwargs)


def test_tridiagonal_structure_trains_and_resumes():
    def build():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 5))
        compiled = kronograph.compile(model, torch.randn(2, 5), loss="mse")
        return model, kronograph.optim.KFAC(compiled, structure="tridiagonal", seed=1, damping=1.0, inverse_every=2)

    generator = torch.Generator().manual_seed(0)
    batches = [(x, x) for x in (torch.randn(32, 5, generator=generator) for _ in range(8))]
    model, optimizer = build()
    losses = [optimizer.step(*batch)["loss"] for batch in batches]
    assert optimizer.curvature.inverse is not None and losses[-1] < losses[0]
    half, half_optimizer = build()
    for batch in batches[:4]:
        half_optimizer.step(*batch)
    resumed, resumed_optimizer = build()
    resumed.load_state_dict(copy.deepcopy(half.state_dict()))
    resumed_optimizer.load_state_dict(copy.deepcopy(half_optimizer.state_dict()))
    assert [resumed_optimizer.step(*batch)["loss"] for batch in batches[4:]] == losses[4:]


def test_tridiagonal_refuses_convolutions():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with pytest.raises(kronograph.KronographError, match="linear layers only"):
        kronograph.optim.KFAC(kronograph.compile(model, torch.randn(2, 1, 6, 6)), structure="tridiagonal")


def test_tridiagonal_diagonal_factors_equal_the_block_diagonal_ones():
    x, y = data()
    factors = []
    for structure in ("diagonal", "tridiagonal"):
        model = make_model()
        optimizer = kronograph.optim.KFAC(kronograph.compile(model, (x,)), **SETTINGS, structure=structure)
        optimizer.step(x, y)
        factors.append([(b.a, b.g) for b in optimizer.blocks.values()])
    for (a1, g1), (a2, g2) in zip(*factors):
        assert torch.allclose(a1, a2, atol=1e-12) and torch.allclose(g1, g2, atol=1e-12)


def wide_mlp_after_one_step(n: int, **settings):
    """A 40-50-3 MLP (float64) after one K-FAC step on a batch of n, the batch, and the optimizer."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(40, 50), nn.Tanh(), nn.Linear(50, 3)).double()
    x, y = torch.randn(n, 40, dtype=torch.float64), torch.randint(0, 3, (n,))
    optimizer = kronograph.optim.KFAC(kronograph.compile(model, (x,)), **{**SETTINGS, **settings})
    optimizer.step(x, y)
    return model, x, y, optimizer


def assert_rows_give_the_direct_proposal(optimizer, grads) -> None:
    inverses = optimizer.curvature.current()
    by_rows = optimizer._proposal(grads, inverses)
    optimizer._rows = {}
    direct = optimizer._proposal(grads, inverses)
    for name in direct:
        assert torch.allclose(by_rows[name], direct[name], atol=1e-12, rtol=1e-9), name


def test_low_rank_product_of_section_8_equals_the_direct_one():
    _, x, y, optimizer = wide_mlp_after_one_step(4, weight_decay=0.0)
    loss, _, grads, _ = optimizer._gradient((x,), y)
    assert set(optimizer._rows) == {"0"}  # 4 rows against 41 x 50; the 51 x 3 head is cheaper directly
    assert_rows_give_the_direct_proposal(optimizer, grads)


def test_low_rank_product_from_signal_scalings_halves_equals_the_direct_one():
    # signal_scaling passes the batch as two halves (on the steps that measure s); their rows, each half's Q
    # weighted by its share, make the same low-rank product as the whole batch's gradient (halves of 3 and 4).
    model, x, y, optimizer = wide_mlp_after_one_step(7, weight_decay=0.0, fisher="mc", signal_scaling=True,
                                                     signal_every=1)
    loss, _, grads, _ = optimizer._gradient((x,), y)
    assert optimizer._half_difference is not None and set(optimizer._rows) == {"0"}
    whole = torch.func.grad(lambda p: nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y))(
        dict(model.named_parameters()))
    for name in whole:
        assert torch.allclose(grads[name], whole[name], atol=1e-12)
    assert_rows_give_the_direct_proposal(optimizer, grads)


def test_low_rank_rows_of_the_halves_difference_equal_the_direct_solve():
    # signal_scaling preconditions d = (g_A - g_B) / 2 on the steps that measure s; its rows (the halves' Q
    # weighted +1/2, -1/2) give F^-1 d by the low-rank product, equal to the direct solve of d from the halves'
    # autograd gradients.
    model, x, y, optimizer = wide_mlp_after_one_step(7, weight_decay=0.0, fisher="mc", signal_scaling=True,
                                                     signal_every=1)
    optimizer._gradient((x,), y)
    assert set(optimizer._difference_rows) == {"0"}
    params = dict(model.named_parameters())

    def half(rows):
        return torch.func.grad(lambda p: nn.functional.cross_entropy(torch.func.functional_call(model, p, (x[rows],)),
                                                                     y[rows]))(params)
    first, second = half(slice(0, 3)), half(slice(3, 7))
    difference = {name: (first[name] - second[name]) / 2 for name in params}
    for name in difference:
        assert torch.allclose(optimizer._half_difference[name], difference[name], atol=1e-12)
    inverses = optimizer.curvature.current()
    by_rows = optimizer.curvature.direction(difference, inverses, optimizer._difference_rows)
    direct = optimizer.curvature.direction(difference, inverses, {})
    for name in direct:
        assert torch.allclose(by_rows[name], direct[name], atol=1e-12, rtol=1e-9), name


def test_quadratic_form_by_rows_equals_the_dense_kronecker_form():
    # signal_scaling's d^T F^-1 d from the halves' rows and the proposal's P A^-1, against vec(D)^T (A^-1 kron G^-1)
    # vec(D) with the Kronecker product formed explicitly from d's W_bar = [grad W, grad b].
    model, x, y, optimizer = wide_mlp_after_one_step(7, weight_decay=0.0, fisher="mc", signal_scaling=True,
                                                     signal_every=1)
    _, _, grads, _ = optimizer._gradient((x,), y)
    inverses = optimizer.curvature.current()
    right_rows: dict = {}
    optimizer.curvature.direction(grads, inverses, optimizer._rows, right_rows)
    assert set(right_rows) == {"0"}
    by_rows = float(optimizer.curvature.quadratic_form_by_rows(optimizer._difference_rows, inverses, right_rows))
    d = optimizer._half_difference
    bar = torch.cat([d["0.weight"], d["0.bias"][:, None]], dim=1)  # [g, a]
    inverse = inverses["0"]
    dense = torch.kron(inverse.a_inv[0], inverse.g_inv[0])  # vec(G^-1 X A^-1) = (A^-1 kron G^-1) vec(X), columns
    vec = bar.T.reshape(-1)
    assert by_rows == pytest.approx(float(vec @ dense @ vec), rel=1e-9)


def test_weight_decay_keeps_the_low_rank_product_off_with_the_empirical_fisher():
    # The rows carry the loss's gradient only; eta W is full rank, so with weight decay the proposal is the
    # direct one even where the empirical Fisher's pass captured the rows (it was not before).
    _, x, y, optimizer = wide_mlp_after_one_step(4)
    optimizer._gradient((x,), y, capture=True)
    assert optimizer._rows == {}


class Branching(nn.Module):
    """A layer on a branch that is taken only from some step on (a conditional block, a layer unfrozen later)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.late, self.last = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.branch = True  # compiled with the branch, so the plan has the late layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if self.branch:
            h = torch.tanh(self.late(h))
        return self.last(h)


@pytest.mark.parametrize("backing_off", [False, True])
def test_a_layer_seen_late_steps_on_its_own_then_starts_from_its_batch_factor(backing_off):
    """Called from step 3 with statistics every 5 steps: at steps 3-5 it has a gradient but no curvature, so it
    takes the unmatched parameters' direction and coefficient (RMS shape: -c sign(g) on its first step); at
    step 6 its A is the batch's own (not (1 - decay) of it) and it is inverted at once. So also where
    ``unmatched_backoff`` is leaving the unmatched direction out for steps to come: a layer without statistics is
    never left out."""
    model = Branching()
    cm = kronograph.compile(model, (torch.randn(2, 5),))
    opt = kronograph.optim.KFAC(cm, seed=0, stats_every=5, momentum=None, reject_steps=False, signal_scaling=False)
    generator = torch.Generator().manual_seed(2)
    model.branch = False
    with pytest.warns(Warning, match="not seen"):
        for _ in range(2):
            opt.step(torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    model.branch = True
    if backing_off:
        opt.unmatched_rest = 5
    x, y = torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    probe = copy.deepcopy(model)
    nn.functional.cross_entropy(probe(x), y).backward()
    before = model.late.weight.detach().clone()
    info = opt.step(x, y)
    assert "late" not in opt.blocks or opt.blocks["late"].inverses is None
    assert info["unmatched_scale"] > 0
    expected = -info["unmatched_scale"] * torch.sign(probe.late.weight.grad)
    torch.testing.assert_close(model.late.weight.detach() - before, expected, rtol=1e-4, atol=1e-7)
    for _ in range(2):
        opt.step(torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator))
    x = torch.randn(32, 5, generator=generator)
    with torch.no_grad():
        a_bar = torch.cat([torch.tanh(model.first(x)), torch.ones(32, 1)], dim=1).double()
    opt.step(x, torch.randint(0, 3, (32,), generator=generator))  # step 6: the second statistics update
    block = opt.blocks["late"]
    torch.testing.assert_close(block.a[0].double(), a_bar.T @ a_bar / 32, rtol=1e-5, atol=1e-6)
    assert block.inverses is not None and opt.stats_updates == 2


@pytest.mark.parametrize("frozen", ["0", "2"])
def test_layers_frozen_and_unfrozen_after_compile(frozen):
    """Fine-tuning schedules freeze layers after compile: the first layer (its site then gets no gradient) or a
    middle one (its low-rank product of sec 8 would not be zero) stays exactly as it is, momentum included,
    while the others train; unfrozen, it trains again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 20),)), seed=0)
    assert opt._low_rank_layers(4)
    generator = torch.Generator().manual_seed(3)

    def step():
        return opt.step(torch.randn(4, 20, generator=generator), torch.randint(0, 3, (4,), generator=generator))

    for _ in range(3):
        step()
    layer = model[int(frozen)]
    layer.requires_grad_(False)
    kept = [p.detach().clone() for p in layer.parameters()]
    others = [p.detach().clone() for p in model[4].parameters()]
    for _ in range(4):
        assert "skipped" not in step()
    assert all(torch.equal(p, q) for p, q in zip(kept, layer.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(others, model[4].parameters()))
    layer.requires_grad_(True)
    for _ in range(3):
        step()
    assert not all(torch.equal(p, q) for p, q in zip(kept, layer.parameters()))
