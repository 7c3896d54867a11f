"""Losses, their output curvature, sampled Fisher targets and the exact-F quadratic model, against dense maths."""

from __future__ import annotations

import math

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


def test_sampled_classes_follow_the_softmax_and_never_take_an_impossible_class():
    """Cross-entropy's targets come from its softmax's cumulative sum at one uniform draw a row: over 200,000 rows
    each class's frequency is its probability (within 5 binomial standard deviations), a class of probability 0
    (a -inf logit) is never drawn, the same generator seed gives the same classes, and a row that is not finite
    gets a class in range without raising (its gradient is refused by the statistics)."""
    loss = get_loss("cross_entropy")
    logits = torch.tensor([0.0, 1.0, -math.inf, 2.0, 0.5])
    rows = 200000
    targets = loss.sample_targets(logits.expand(2, rows // 2, 5).clone(), torch.Generator().manual_seed(0))
    assert targets.shape == (2, rows // 2)
    frequency = torch.bincount(targets.reshape(-1), minlength=5).double() / rows
    p = torch.softmax(logits.double(), 0)
    assert frequency[2] == 0
    assert torch.all((frequency - p).abs() <= 5 * (p * (1 - p) / rows).sqrt() + 1e-12), (frequency, p)
    again = loss.sample_targets(logits.expand(2, rows // 2, 5).clone(), torch.Generator().manual_seed(0))
    assert torch.equal(targets, again)
    for bad in (math.nan, math.inf, -math.inf):
        broken = loss.sample_targets(torch.tensor([[0.0, bad, 1.0]] * 50), torch.Generator().manual_seed(0))
        assert broken.min() >= 0 and broken.max() <= 2


def test_bad_targets_are_named():
    outputs = torch.randn(4, 3)
    with pytest.raises(KronographError, match=r"labels must lie in \[0, 2\]"):
        get_loss("cross_entropy").check_targets(outputs, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(KronographError, match="integer class labels"):
        get_loss("cross_entropy").check_targets(outputs, torch.zeros(4))
    with pytest.raises(KronographError, match=r"classes on dim 1 .*output=lambda out: out\.movedim\(1, -1\)"):
        get_loss("cross_entropy").check_targets(torch.randn(4, 3, 5, 5), torch.zeros(4, 5, 5, dtype=torch.long))
    with pytest.raises(KronographError, match="one label per output row"):
        get_loss("cross_entropy").check_targets(torch.randn(4, 3, 5, 5), torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(KronographError, match=r"in \[0, 1\]"):
        get_loss("sigmoid_cross_entropy").check_targets(outputs, torch.full((4, 3), 2.0))
    get_loss("mse").check_targets(outputs, torch.full((4, 3), float("nan")))  # not an error: KFAC skips such a step
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


def _kkt_residual(matrix, g, c, bounds):
    """The largest violation of the bounded problem's optimality conditions at c (KKT: low <= c <= high, the
    model's gradient zero where c is strictly inside, >= 0 where c sits at a finite lower bound, <= 0 at an
    upper one)."""
    slope = matrix @ c + g
    worst = 0.0
    for a, (low, high) in enumerate(bounds):
        value = float(c[a])
        if value == low:
            worst = max(worst, float(-slope[a]))
        elif value == high:
            worst = max(worst, float(slope[a]))
        else:
            worst = max(worst, abs(float(slope[a])))
        worst = max(worst, low - value, value - high)
    return worst


@pytest.mark.parametrize("mu_bounds", [(-math.inf, math.inf), (0.0, 1.0)])
def test_bounded_quadratic_model_meets_the_kkt_conditions(mu_bounds):
    # Random 3-direction models (K-FAC's proposal, the unmatched gradient step, the previous update): the
    # bounded minimiser keeps the first two coefficients >= 0 (and mu in [0, 1] where asked) and satisfies the
    # optimality conditions of the bounded problem, which for a positive definite matrix identify its unique
    # minimiser.
    generator = torch.Generator().manual_seed(5)
    bounds = [(0.0, math.inf), (0.0, math.inf), mu_bounds]
    negative_seen = above_one_seen = at_one = 0
    for _ in range(200):
        basis = torch.randn(8, 3, generator=generator, dtype=torch.float64)
        curvature = torch.randn(8, 8, generator=generator, dtype=torch.float64)
        curvature = curvature @ curvature.T
        grad = 10 * torch.randn(8, generator=generator, dtype=torch.float64)  # coefficients of size ~1
        gram_f, gram_i, g = basis.T @ curvature @ basis, basis.T @ basis, basis.T @ grad
        free = solve_quadratic_model(gram_f, gram_i, g, 0.1)
        negative_seen += min(free.coefficients) < 0
        above_one_seen += free.coefficients[2] > 1
        bounded = solve_quadratic_model(gram_f, gram_i, g, 0.1, bounds=bounds)
        at_one += bounded.coefficients[2] == 1.0
        c = torch.tensor(bounded.coefficients, dtype=torch.float64)
        assert _kkt_residual(gram_f + 0.1 * gram_i, g, c, bounds) < 1e-9
        value = 0.5 * c @ (gram_f + 0.1 * gram_i) @ c + g @ c
        assert bounded.decrease == pytest.approx(float(value), abs=1e-9)
        assert bounded.decrease >= free.decrease - 1e-12
    assert negative_seen > 20  # the bounds were active in many of the cases
    if mu_bounds[1] == 1.0:
        assert above_one_seen > 10 and at_one > 10


def test_ill_conditioned_quadratic_model_drops_the_near_parallel_direction():
    # Two nearly parallel directions: unbounded, their coefficients are huge and of opposite sign (fitting
    # rounding); with max_condition the system is treated as singular and one direction carries the step.
    torch.manual_seed(6)
    fisher = torch.randn(5, 5, dtype=torch.float64)
    fisher = fisher @ fisher.T
    d0 = torch.randn(5, dtype=torch.float64)
    d1 = d0 + 1e-5 * torch.randn(5, dtype=torch.float64)
    grad = torch.randn(5, dtype=torch.float64)
    vectors = [d0, d1]
    gram_f = torch.tensor([[u @ fisher @ v for v in vectors] for u in vectors])
    gram_i = torch.tensor([[u @ v for v in vectors] for u in vectors])
    g = torch.stack([grad @ d0, grad @ d1])
    wild = solve_quadratic_model(gram_f, gram_i, g, 0.1)
    assert max(abs(c) for c in wild.coefficients) > 1e3
    tame = solve_quadratic_model(gram_f, gram_i, g, 0.1, max_condition=1e8)
    alpha = -(grad @ d0) / (d0 @ fisher @ d0 + 0.1 * d0 @ d0)
    assert sum(tame.coefficients) == pytest.approx(float(alpha), rel=1e-4)
    assert min(abs(c) for c in tame.coefficients) == 0.0


@pytest.mark.parametrize("products,tolerance", [("differences", 1e-3), ("one-sided", 2e-3)])
def test_differences_on_the_torch_engine_equal_the_explicit_jacobian_and_leave_the_module_alone(products, tolerance):
    """Central and one-sided differences, through batch norm in training mode and dropout: every forward of the
    differences draws the mask of the first (else J d would be a difference of two masks)."""
    import kronograph
    from kronograph.runtime.engines.torch import TorchEngine

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3), nn.Linear(5, 2)).train()
    x = torch.randn(7, 3)
    engine = TorchEngine(kronograph.compile(model, (x[:2],), loss="mse"), get_loss("mse"), products=products)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    directions = [{k: torch.randn_like(v) for k, v in params.items()}, {"4.weight": 1e-3 * torch.randn(2, 5)}]
    state = torch.get_rng_state()  # the masks the engine's forwards draw
    outputs, tangents = engine.output_tangents((x,), directions)

    names = list(params)
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def outputs_of(theta: torch.Tensor) -> torch.Tensor:
        values = dict(zip(names, torch.split(theta, [p.numel() for p in params.values()])))
        values = {k: v.reshape(params[k].shape) for k, v in values.items()}
        torch.set_rng_state(state)
        return torch.func.functional_call(model, {**values, **{k: b.clone() for k, b in buffers.items()}}, (x,))

    jacobian = torch.autograd.functional.jacobian(outputs_of, flat)  # [n, out, P]
    for direction, tangent in zip(directions, tangents):
        vector = torch.cat([direction.get(k, torch.zeros_like(p)).reshape(-1) for k, p in params.items()])
        want = (jacobian @ vector).double()
        assert float((tangent - want).norm() / want.norm()) < tolerance
    torch.testing.assert_close(outputs.double(), outputs_of(flat).detach().double(), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(params[k].detach(), before[k]) for k in params)  # bit for bit
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())


@pytest.mark.parametrize("products", ["differences", "one-sided"])
def test_differences_shrink_their_step_where_the_outputs_bend_within_it(products):
    """25 batch-normed layers in training mode: along a random direction the outputs change by ~30% of their norm
    within the step that moves each tensor by DIFFERENCE_STEP, and differences there were 64-72% off forward mode's
    J d (BENCHMARKS.md); with h shrunk until the outputs change by LINEAR_OUTPUT_CHANGE they are within 4%."""
    import kronograph
    from kronograph.runtime.engines.torch import TorchEngine

    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU()]
    for _ in range(24):
        layers += [nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(8, 4)).train()
    x = torch.randn(64, 16)
    params = dict(model.named_parameters())
    torch.manual_seed(1)
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    _, want = torch.func.jvp(
        lambda *v: torch.func.functional_call(model, {**dict(zip(params, v)), **{k: b.clone() for k, b in
                                                                                 buffers.items()}}, (x,)),
        tuple(p.detach() for p in params.values()), tuple(direction.values()))
    engine = TorchEngine(kronograph.compile(model, (x[:2],), loss="cross_entropy"), get_loss("cross_entropy"),
                         products=products)
    _, (tangent,) = engine.output_tangents((x,), [direction])
    assert float((tangent - want).norm() / want.norm()) < 0.04


@pytest.mark.parametrize("products", ["differences", "one-sided"])
def test_differences_taken_in_place_leave_an_output_that_is_the_input_alone(products):
    """The differences subtract in the shifted forward's outputs; a model whose outputs are its input's memory (half
    of them here: a view) gets copies, so its input is never overwritten, and the tangents are still right."""
    import kronograph
    from kronograph.runtime.engines.torch import TorchEngine

    class PassThrough(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :4] if self.lin(x[:, :4]).shape[0] > 100 else x[:, :4]  # the layer runs, its output unused

    torch.manual_seed(0)
    model, x = PassThrough(), torch.randn(6, 8)
    kept = x.clone()
    engine = TorchEngine(kronograph.compile(model, (x[:2],), loss="mse"), get_loss("mse"), products=products)
    outputs, tangents = engine.output_tangents((x,), [{k: torch.randn_like(v) for k, v in model.named_parameters()}])
    assert torch.equal(x, kept) and torch.equal(outputs, kept[:, :4])
    assert torch.count_nonzero(tangents[0]) == 0


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4)])
def test_the_curvature_gram_is_every_pair_of_tangents_through_the_explicit_hessian(name, shape):
    """Each loss's Gram (its Hessian's root formed once for all pairs) against sum_i t_a,i^T H_i t_b,i with
    H_i from autograd, in float32 inputs too (the Gram is float64 either way)."""
    torch.manual_seed(2)
    loss = get_loss(name)
    outputs = torch.randn(shape)
    tangents = [torch.randn(shape) for _ in range(3)]
    targets = _targets(name, outputs)
    want = torch.zeros(3, 3)
    for i in range(shape[0]):
        hessian = torch.autograd.functional.hessian(
            lambda s: loss.per_example(s.unsqueeze(0), targets[i : i + 1])[0], outputs[i]
        ).reshape(outputs[i].numel(), -1)
        rows = torch.stack([t[i].reshape(-1) for t in tangents])
        want += rows @ hessian @ rows.T
    assert torch.allclose(loss.curvature_gram_sum(outputs, tangents), want, atol=1e-10)
    single = loss.curvature_gram_sum(outputs.float(), [t.float() for t in tangents])
    assert single.dtype == torch.float64 and torch.allclose(single, want, rtol=1e-5, atol=1e-5)


def _dense_cross_entropy_gram(outputs: torch.Tensor, tangents: list[torch.Tensor]) -> torch.Tensor:
    """sum_i t_a,i^T (diag p_i - p_i p_i^T) t_b,i / positions, in float64 with the Hessians written out."""
    classes = outputs.shape[-1]
    p = torch.softmax(outputs.double(), dim=-1).reshape(-1, classes)
    hessians = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    rows = torch.stack([t.double().reshape(-1, classes) for t in tangents], dim=1)  # [positions, k, classes]
    return (rows @ hessians @ rows.transpose(1, 2)).sum(0) / math.prod(outputs.shape[1:-1])


def test_the_cross_entropy_gram_in_chunks_of_rows_keeps_float32_free_of_cancellation(monkeypatch):
    """The cross-entropy Gram goes through the rows in chunks (here 3 rows of 5 classes, the last chunk short) and
    centres each row's tangents under p before multiplying. Tangents that mostly shift every logit by the same
    amount (H's null direction, 1e4 times the part that counts): in float64 the Gram is the dense one of the
    unshifted tangents (H_i 1 = 0); in float32 that of the float32 tangents, to float32's rounding of the part that
    counts (uncentred, t^T diag(p) t and <p, t>^2 are each ~1e8 times it and their float32 difference is noise)."""
    from kronograph.runtime import losses

    monkeypatch.setattr(losses, "_CHUNK_ENTRIES", 15)
    generator = torch.Generator().manual_seed(4)
    outputs = torch.randn(4, 2, 5, dtype=torch.float64, generator=generator) * 2
    signal = [torch.randn(4, 2, 5, dtype=torch.float64, generator=generator) for _ in range(3)]
    tangents = [s + 1e4 * torch.randn(4, 2, 1, dtype=torch.float64, generator=generator) for s in signal]
    loss = get_loss("cross_entropy")
    torch.testing.assert_close(loss.curvature_gram_sum(outputs, tangents), _dense_cross_entropy_gram(outputs, signal),
                               rtol=1e-9, atol=1e-9)
    outputs, tangents = outputs.float(), [t.float() for t in tangents]
    single, want = loss.curvature_gram_sum(outputs, tangents), _dense_cross_entropy_gram(outputs, tangents)
    assert single.dtype == torch.float64
    torch.testing.assert_close(single, want, rtol=1e-5, atol=1e-5 * float(want.diagonal().max()))


@pytest.mark.parametrize("bounds", [None, [(0.0, math.inf), (0.0, math.inf), (0.0, 1.0)]])
def test_a_decrease_beyond_the_bound_is_shortened_along_the_minimiser(bounds):
    """max_decrease below the minimiser's decrease: the coefficients are t c (c the minimiser without the bound,
    0 < t < 1) and the dense model's value there, 1/2 d^T (F + lambda I) d + grad^T d for d = basis (t c), is
    -max_decrease; the smaller root (the model still falling at t); a bound it does not reach changes nothing."""
    generator = torch.Generator().manual_seed(6)
    for _ in range(50):
        basis = torch.randn(8, 3, generator=generator, dtype=torch.float64)
        curvature = torch.randn(8, 8, generator=generator, dtype=torch.float64)
        curvature = curvature @ curvature.T
        grad = 10 * torch.randn(8, generator=generator, dtype=torch.float64)
        gram_f, gram_i, g = basis.T @ curvature @ basis, basis.T @ basis, basis.T @ grad
        free = solve_quadratic_model(gram_f, gram_i, g, 0.1, bounds)
        if free.decrease == 0:  # every direction uphill: nothing to shorten
            continue
        assert solve_quadratic_model(gram_f, gram_i, g, 0.1, bounds, max_decrease=-free.decrease * 1.01) == free
        limit = -free.decrease / 7
        short = solve_quadratic_model(gram_f, gram_i, g, 0.1, bounds, max_decrease=limit)
        c = torch.tensor(free.coefficients, dtype=torch.float64)
        s = torch.tensor(short.coefficients, dtype=torch.float64)
        t = float(s @ c / (c @ c))
        assert 0 < t < 1 and torch.allclose(s, t * c, rtol=0, atol=1e-12)
        d = basis @ s
        value = 0.5 * d @ (curvature + 0.1 * torch.eye(8, dtype=torch.float64)) @ d + grad @ d
        assert float(value) == pytest.approx(-limit, rel=1e-9) and short.decrease == pytest.approx(-limit, rel=1e-12)
        slope = basis.T @ ((curvature + 0.1 * torch.eye(8, dtype=torch.float64)) @ d + grad)
        assert float(slope @ c) < 0  # still falling along c: the first crossing, not the one past the minimum
