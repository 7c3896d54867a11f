"""The first-try defaults of KFAC (runtime/methods/kfac_settings.py, issue 10) on constructed cases, and the paper preset.

Independent checks: the curvature scale against the eigenvalues of the dense Kronecker product, the
initial lambda against a regression whose inputs are scaled by a known factor, a step that raises h
undone to the exact weights before it, the paper preset step for step against the paper's settings
spelled out argument by argument.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn

import kronograph
from kronograph.runtime.damping import (
    accelerated_levenberg_marquardt,
    below_rounding,
    curvature_scale,
    gamma_candidates,
    gamma_interval,
    gamma_power,
    gamma_streak,
    levenberg_marquardt,
)
from kronograph.runtime.inverse import (
    CoverageWarning,
    StatisticsWarning,
    UntrustedModelWarning,
    factored_inverses,
    precondition,
)
from kronograph.runtime.losses import get_loss
from kronograph.runtime.methods import kfac as kfac_module
from kronograph.runtime.methods.kfac_settings import PRESETS

# The paper's sec 13 settings as KFAC's arguments were before presets existed.
PAPER_ARGUMENTS = dict(lr=1.0, damping=150.0, factor_damping=None, weight_decay=0.0, ema_decay=None, fisher="mc",
                       stats_fraction=1 / 8, stats_every=1, inverse_every=20, momentum="qmodel", rescale=True,
                       adapt_damping=None, adapt_gamma=None, qmodel_fraction=1 / 4, damping_every=5, gamma_every=20,
                       min_damping=1e-8, structure="diagonal")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def normed_mlp(seed: int = 0) -> nn.Module:
    """LayerNorm's scale and shift lie outside every Kronecker block: unmatched parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


class Recurrent(nn.Module):
    """A GRU on sequences of 8-wide inputs and a linear head on its last state."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gru, self.head = nn.GRU(8, hidden, batch_first=True), nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])


def batches(steps: int, n: int = 32, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=generator), torch.randint(0, 3, (n,), generator=generator)) for _ in range(steps)]


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class _Block:
    def __init__(self, a: torch.Tensor, g: torch.Tensor) -> None:
        self.a, self.g = a, g


def test_curvature_scale_is_the_mean_eigenvalue_of_the_dense_kronecker_product():
    torch.manual_seed(0)
    factors = []
    for groups, da, dg in ((1, 4, 3), (2, 3, 2)):
        a = torch.randn(groups, da, da, dtype=torch.float64)
        g = torch.randn(groups, dg, dg, dtype=torch.float64)
        factors.append((a @ a.transpose(1, 2), g @ g.transpose(1, 2)))
    eigenvalues = torch.cat([torch.linalg.eigvalsh(torch.kron(a[k], g[k])) for a, g in factors for k in range(a.shape[0])])
    assert curvature_scale([_Block(a, g) for a, g in factors]) == pytest.approx(float(eigenvalues.mean()), rel=1e-10)


def test_accelerated_lm_is_the_papers_rule_at_cap_one_and_speeds_up_on_a_streak():
    omega = 19 / 20
    for rho in (0.9, 0.5, 0.1, -3.0):
        assert accelerated_levenberg_marquardt(10.0, rho, omega, 5, 1)[0] == levenberg_marquardt(10.0, rho, omega)
    damping, streak = 1.0, 0
    for j in range(1, 12):
        previous = damping
        damping, streak = accelerated_levenberg_marquardt(damping, 0.9, omega, streak, 8)
        assert streak == j and damping == pytest.approx(previous * omega ** min(j, 8))
    damping, streak = accelerated_levenberg_marquardt(damping, 0.1, omega, streak, 8)  # verdict flips: one step
    assert streak == -1
    assert accelerated_levenberg_marquardt(damping, 0.5, omega, streak, 8) == (damping, 0)


def test_below_rounding_is_a_change_float32_h_cannot_show():
    eps = 2.0**-24
    assert below_rounding(0.0, 0.0, -1e-30)  # a loss that rounds to 0 stays 0: whatever was predicted
    assert below_rounding(1.0, 1.0, -1e-3)  # h did not move at all
    assert below_rounding(2e-10, 2e-10 * (1 + 4 * eps), -2e-10 * eps)  # both within 16 roundings of h
    assert not below_rounding(1.0, 1.0 - 1e-3, -2e-3)  # a step h can resolve: rho = 1/2 is information
    assert not below_rounding(1.0, 1.0 + 20 * eps, -1e-9)  # h rose by more than its rounding
    assert not below_rounding(1.0, 1.0 + eps, -1e-3)  # a resolvable decrease was predicted and did not come
    # a loss with a floor (cross-entropy: 2^-24 an example) keeps it however small h gets; mse has none
    assert below_rounding(2e-9, 3e-9, -1e-9, floor=1.0) and not below_rounding(2e-9, 3e-9, -1e-9)
    assert not below_rounding(2e-9, 2e-6, -1e-9, floor=1.0)  # far beyond 16 roundings of the floor
    y_classes, y_pixels = torch.zeros(8, dtype=torch.long), torch.zeros(8, 784)
    assert get_loss("cross_entropy").rounding_floor(y_classes) == 1.0
    assert get_loss("sigmoid_cross_entropy").rounding_floor(y_pixels) == 784.0
    assert get_loss("mse").rounding_floor(y_pixels) == 0.0


def test_a_fitted_batch_leaves_lambda_where_it_was():
    """One batch of 16 fitted until h rounds to 0 in float32: from then on every step leaves h exactly as it was,
    and the paper's LM rule (rho = 0: distrust), accelerated, grows lambda by 1.5x a step without end (past 1e14
    in 150 steps, on to overflow); the default keeps lambda once the steps are below h's rounding."""
    final = {}
    for keep in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0,
                                    keep_damping_at_rounding=keep)
        infos = [opt.step(x, y) for _ in range(150)]
        assert infos[-1]["loss"] < 1e-6
        final[keep] = opt.damping
    assert final[True] < 10.0 and final[False] > 1e10


def test_on_a_fitted_batch_gamma_stays_and_no_step_is_undone_for_a_rise_below_rounding():
    """The same fitted batch: once its cross-entropy is within 16 roundings of its float32 floor (2^-24 an
    example), every gamma candidate's predicted decrease is noise too, and so is a rise of h: lambda, gamma and
    the count of undone steps stay as they were (before, lambda rose 2e4-fold there and gamma wandered)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0)
    infos = [opt.step(x, y) for _ in range(150)]
    assert max(info["loss"] for info in infos[40:]) < 16 * 2.0**-24
    settled = {(info["damping"], info["factor_damping"], info["rejected_steps"]) for info in infos[40:]}
    assert len(settled) == 1, sorted(settled)


def deep_batch_norm_mlp(depth: int) -> nn.Module:
    """Linear (no bias), batch norm, ReLU, ``depth`` + 1 times, then a 4-class head: BENCHMARKS.md's torchvision
    failure in small (batch norm in training mode through depth, no residuals)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 4))


def teacher_batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of 64 16-wide inputs, labelled by a random linear teacher's arg-max of 4."""
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 4, generator=generator)
    return [(x, (x @ teacher).argmax(1)) for x in (torch.randn(64, 16, generator=generator) for _ in range(count))]


@pytest.mark.parametrize("depth, warned", [(24, True), (4, False)])
def test_a_quadratic_model_that_fails_from_the_start_is_reported_once(depth, warned):
    """24 batch-normed layers: the first 20 steps' rho has a median far below 0.1 (0.015), lambda grows 1e5-fold and
    the loss stays flat, and KFAC says so once (UntrustedModelWarning, naming the median, what it does now and the
    way out) and steps with SGD with Nesterov momentum from then on (batch norm: untrusted_fallback's auto); 4 layers
    train (median rho 0.66) without it, on K-FAC's steps."""
    opt = kronograph.optim.KFAC(kronograph.compile(deep_batch_norm_mlp(depth), (torch.randn(2, 16),)),
                                seed=0, batches_per_step=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = [opt.step(x, y) for x, y in teacher_batches(30)]
    untrusted = [str(w.message) for w in caught if issubclass(w.category, UntrustedModelWarning)]
    assert len(untrusted) == int(warned), untrusted
    assert [bool(info.get("sgd")) for info in infos] == [warned and k >= 20 for k in range(30)]
    assert not any(info.get("adam") for info in infos)
    if warned:
        assert "median rho 0.0" in untrusted[0] and "GroupNorm" in untrusted[0]
        assert "SGD with Nesterov momentum 0.9 (lr 0.01)" in untrusted[0]


def plain_mlp() -> nn.Module:
    """deep_batch_norm_mlp(4)'s layers without its batch norms."""
    torch.manual_seed(0)
    return nn.Sequential(*[layer for layer in deep_batch_norm_mlp(4) if not isinstance(layer, nn.BatchNorm1d)])


@pytest.mark.parametrize("make, settings, warned", [
    (lambda: deep_batch_norm_mlp(4), dict(untrusted_rho=10.0), False),  # batch norm: its own threshold (0.5) decides
    (lambda: deep_batch_norm_mlp(4), dict(untrusted_rho_batch_norm=10.0), True),
    (lambda: deep_batch_norm_mlp(4), dict(untrusted_rho_batch_norm=None, untrusted_rho=10.0), True),
    (lambda: deep_batch_norm_mlp(4), dict(untrusted_rho=None, untrusted_rho_batch_norm=10.0), False),  # never judged
    (plain_mlp, dict(untrusted_rho_batch_norm=10.0), False),  # no batch norm: untrusted_rho (0.1) decides
    (plain_mlp, dict(untrusted_rho=10.0), True),
])
def test_a_model_with_batch_norm_is_judged_by_its_own_threshold(make, settings, warned):
    """The median of the first 20 steps' rho is compared with untrusted_rho_batch_norm where the graph has a
    BatchNormalization node, with untrusted_rho otherwise; untrusted_rho=None never judges."""
    opt = kronograph.optim.KFAC(kronograph.compile(make(), (torch.randn(2, 16),)),
                                seed=0, **settings, batches_per_step=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = [opt.step(x, y) for x, y in teacher_batches(22)]
    assert sum(issubclass(w.category, UntrustedModelWarning) for w in caught) == int(warned)
    fallback = "sgd" if make is not plain_mlp else "adam"  # untrusted_fallback's auto: SGD where batch norm is
    assert bool(infos[-1].get(fallback)) == warned


@pytest.mark.parametrize("fallback, settings, optimizer", [
    ("adam", dict(untrusted_fallback="adam", untrusted_adam_lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
    ("sgd", dict(untrusted_sgd_lr=0.03), lambda p: torch.optim.SGD(p, lr=0.03, momentum=0.9, nesterov=True)),
], ids=["adam", "sgd"])
def test_after_an_untrusted_start_the_steps_are_torchs(fallback, settings, optimizer):
    """From the step after the judgement, KFAC's steps are torch.optim.Adam's (untrusted_fallback="adam": lr
    untrusted_adam_lr, PyTorch's defaults otherwise) or SGD's with Nesterov momentum 0.9 (auto on this batch-norm net:
    lr untrusted_sgd_lr), their moments carried from step to step, on the mean loss's gradient of the whole batch,
    batch norm's running statistics included; a checkpoint taken then resumes them exactly; with the learning rate
    None the warning comes and K-FAC's steps go on."""
    batches = teacher_batches(30)
    model = deep_batch_norm_mlp(24)
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 16),)),
                                seed=0, **settings, batches_per_step=1)
    with pytest.warns(UntrustedModelWarning, match="Adam" if fallback == "adam" else "SGD with Nesterov"):
        for x, y in batches[:20]:
            opt.step(x, y)
    reference = copy.deepcopy(model)
    torch_optimizer = optimizer(reference.parameters())
    for x, y in batches[20:25]:
        # each step from KFAC's weights (this net amplifies rounding 100-fold a step: its batch norms' exploding
        # gradients), the reference optimizer's moments its own
        reference.load_state_dict(model.state_dict())
        info = opt.step(x, y)
        assert info[fallback] and not info.get({"adam": "sgd", "sgd": "adam"}[fallback])
        torch_optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        torch_optimizer.step()
        for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), name
    resumed_model = copy.deepcopy(model)
    resumed = kronograph.optim.KFAC(kronograph.compile(resumed_model, (torch.randn(2, 16),)),
                                    seed=0, **settings, batches_per_step=1)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x, y in batches[25:]:
        assert opt.step(x, y)[fallback] and resumed.step(x, y)[fallback]
    for (name, ours), theirs in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(ours, theirs), name

    off = {key: None if key.endswith("_lr") else value for key, value in settings.items()}
    kept = kronograph.optim.KFAC(kronograph.compile(deep_batch_norm_mlp(24), (torch.randn(2, 16),)),
                                 seed=0, **off, batches_per_step=1)
    with pytest.warns(UntrustedModelWarning, match="SGD with momentum or Adam"):
        infos = [kept.step(x, y) for x, y in batches]
    assert not any(info.get("adam") or info.get("sgd") for info in infos) and all("alpha" in info for info in infos)


def test_initial_lambda_follows_the_curvature_scale():
    """Linear regression with mse: scaling the inputs by c scales A (so lambda_0) by c^2 and nothing else."""
    def first_lambda(scale: float) -> float:
        torch.manual_seed(0)
        model = nn.Linear(4, 2, bias=False)
        x = torch.randn(64, 4) * scale
        y = torch.randn(64, 2)
        opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="mse"), adapt_damping=False, seed=0,
                                    relative_damping=0.5)
        opt.step(x, y)
        block = next(iter(opt.blocks.values()))
        dense = torch.kron(block.a[0].double(), block.g[0].double())
        assert opt.damping == pytest.approx(0.5 * float(torch.linalg.eigvalsh(dense).mean()), rel=1e-5)
        return opt.damping

    assert first_lambda(10.0) / first_lambda(1.0) == pytest.approx(100.0, rel=1e-4)


@pytest.mark.parametrize("lr, reject_rho", [(30.0, None), (3.0, -0.5)], ids=["h-rises", "rho-below"])
def test_a_step_that_raises_h_is_undone_and_lambda_rises(lr, reject_rho):
    """lr > 2 overshoots the quadratic model's minimiser (M(lr c) - M(0) = lr (2 - lr) (M(c) - M(0)) > 0): lr = 30
    raises h by more than a quarter (the default's test), lr = 3 gives rho < -1/2 (the test when reject_rho is
    set). Every such step must be undone, with the weights exactly as before and lambda raised (signal_scaling
    off: it would shorten the step to as little as lr / 2)."""
    model = mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy"), lr=lr, seed=0,
                                signal_scaling=False, reject_rho=reject_rho)
    for k, (x, y) in enumerate(batches(3)):
        before, damping = params(model), opt.damping
        info = opt.step(x, y)
        assert info["rejected"] and info["rejected_steps"] == k + 1
        assert all(torch.equal(p, q) for p, q in zip(before, params(model)))
        if damping is not None:
            assert opt.damping > damping
        assert opt.previous is None  # a rejected step is no momentum for the next one


@pytest.mark.parametrize("floor", [1.0, None])
def test_an_undone_step_raises_lambda_to_at_least_the_curvatures_scale(floor):
    """lambda given far below the curvature's scale (as a saturated start sets it) and a step that raises h (lr =
    30): the undone step leaves lambda at least the mean eigenvalue of the dense block-diagonal Kronecker factors,
    with the floor; without it, only the LM rule's rise."""
    model = mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy"), lr=30.0,
                                seed=0, signal_scaling=False, damping=1e-12, reject_damping_floor=floor)
    (x, y), = batches(1)
    assert opt.step(x, y)["rejected"]
    dense = torch.block_diag(*[torch.kron(b.a[0].double(), b.g[0].double()) for b in opt.blocks.values()])
    scale = float(torch.linalg.eigvalsh(dense).mean())
    if floor is None:
        assert opt.damping < 1e-9
    else:
        assert opt.damping == pytest.approx(scale, rel=1e-5)


def test_a_good_step_is_kept():
    model = mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy"), seed=0)
    losses = [opt.step(x, y) for x, y in batches(1) * 30]
    assert losses[-1]["loss"] < 0.5 * losses[0]["loss"]
    assert losses[-1]["rejected_steps"] < 30


def test_default_steps_never_take_a_descent_direction_uphill():
    """Batch norm's parameters are unmatched (with ``unmatched_direction="rms"`` a step of their own in the
    quadratic model): the coefficients of K-FAC's proposal and of that step are never negative."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy"), seed=0,
                                unmatched_direction="rms", batches_per_step=1)
    for x, y in batches(25, n=64):
        info = opt.step(x, y)
        assert info["alpha"] >= 0 and info["unmatched_scale"] >= 0


@pytest.mark.parametrize("max_momentum", [2.0, None])
def test_default_momentum_coefficient_stays_in_its_range(max_momentum):
    """A batch of 6 against a 5-8-3 MLP (the regime where the sub-batch's curvature along the previous update
    is mostly missing): the default keeps mu in [0, 2]; the paper's free mu leaves that range (so the bound
    is what keeps it there)."""
    model = mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy"), seed=0,
                                max_momentum=max_momentum, batches_per_step=1)
    mus = [opt.step(x, y)["mu"] for x, y in batches(40, n=6)]
    inside = [0.0 <= mu <= 2.0 for mu in mus]
    if max_momentum is None:
        assert not all(inside)
    else:
        assert all(inside) and any(mu > 0 for mu in mus)


def test_gamma_follows_lambda_when_the_gamma_rule_is_off():
    model = mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy"), seed=0,
                                weight_decay=1e-3, adapt_gamma=False)
    dampings = set()
    for x, y in batches(8):
        info = opt.step(x, y)
        assert info["factor_damping"] == pytest.approx(math.sqrt(info["damping"] + 1e-3))
        dampings.add(info["damping"])
    assert len(dampings) > 1  # lambda moved, and gamma with it


def test_small_batches_use_the_whole_batch_for_the_quadratic_model_and_batch_norm_statistics():
    """Batch 8 with batch norm: tau_1 = 1/8 would be one example (batch norm in training mode fails)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0)
    for _ in range(3):
        assert math.isfinite(opt.step(x, y)["loss"])
    assert all(block.a is not None for block in opt.blocks.values())


def test_gamma_rule_moves_faster_while_one_side_keeps_winning():
    assert gamma_candidates(2.0, 5, power=1) == gamma_candidates(2.0, 5)
    omega2 = math.sqrt(19 / 20) ** 5
    assert gamma_candidates(2.0, 5, power=3) == pytest.approx([2.0, 2.0 * omega2**3, 2.0 / omega2**3])
    streak = 0
    for j in range(1, 5):
        streak = gamma_streak(streak, 1)  # the smaller candidate won again
        assert streak == j and gamma_power(streak, 8) == j + 1
    assert gamma_power(20, 8) == 8 and gamma_streak(streak, 2) == -1 and gamma_streak(streak, 0) == 0


def test_gamma_rule_waits_longer_while_it_keeps_gamma(monkeypatch):
    # settled (gamma kept: streak 0; a move against the last one: streak +-1): the interval doubles, up to 20
    assert [gamma_interval(5, 0, 5, 20), gamma_interval(10, -1, 5, 20), gamma_interval(20, 1, 5, 20)] == [10, 20, 20]
    # moving (one side won twice running), or the paper's rule: T_2
    assert gamma_interval(20, 2, 5, 20) == gamma_interval(20, -3, 5, 20) == gamma_interval(10, 0, 5, None) == 5
    # In the optimizer: each round is due the interval after the last one, doubled when it kept gamma.
    rounds = []  # (step, candidates)
    original = kfac_module.gamma_candidates

    def recording(gamma, every, power=1):
        candidates = original(gamma, every, power)
        rounds.append((opt.steps, every, candidates))
        return candidates

    monkeypatch.setattr(kfac_module, "gamma_candidates", recording)
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # learnable: gamma moves, then settles
    opt = kronograph.optim.KFAC(kronograph.compile(mlp(), (x[:2],), loss="cross_entropy"), seed=0, gamma_every=2,
                                max_gamma_every=8)
    streaks = {}
    for _ in range(60):
        steps = opt.steps + 1
        opt.step(x, y)
        if rounds and rounds[-1][0] == steps:
            streaks[steps] = opt.gamma_streak
    assert rounds[0][:2] == (2, 2) and len(rounds) >= 4
    interval = 2
    for (step, every, _), (following, next_every, _) in zip(rounds, rounds[1:]):
        assert every == interval
        interval = gamma_interval(interval, streaks[step], 2, 8)
        assert following == step + interval and next_every == interval
    assert {every for _, every, _ in rounds} == {2, 4, 8}  # it lengthened, and came back to T_2


@pytest.mark.parametrize("share, least, rounds", [(0.05, 0.1, False), (0.5, 0.1, True), (0.05, None, True),
                                                   (None, 0.1, True)])
def test_the_gamma_rule_skips_its_rounds_while_the_batch_is_mostly_noise(monkeypatch, share, least, rounds):
    """Below ``gamma_rule_min_signal`` a due round tries no candidate and keeps gamma, and the next round is due an
    interval later; at a larger share, without the setting, or before s is measured, the rounds run."""
    tried = []
    original = kfac_module.gamma_candidates
    monkeypatch.setattr(kfac_module, "gamma_candidates", lambda *a, **k: tried.append(a) or original(*a, **k))
    x, y = batches(1)[0]
    opt = kronograph.optim.KFAC(kronograph.compile(mlp(), (x[:2],), loss="cross_entropy"), seed=0, gamma_every=2,
                                gamma_rule_min_signal=least, batches_per_step=1)
    monkeypatch.setattr(opt, "_signal_share", lambda: share)
    gammas, due = [], []
    for x, y in batches(12):
        due.append(opt.next_gamma_round)
        gammas.append(opt.step(x, y)["factor_damping"])
    assert bool(tried) == rounds
    if not rounds:
        assert len(set(gammas)) == 1 and opt.gamma == gammas[0]  # gamma kept
        assert due[:6] == [2, 2, 4, 4, 6, 6]  # each skipped round moves the next one an interval on


@pytest.mark.parametrize("n, halved", [(4, False), (15, False), (16, True)])
def test_batch_norms_halves_have_eight_examples_at_least(n, halved):
    """With batch norm, signal scaling passes a batch of fewer than 16 whole (s counted as 0, all noise): a half of 2
    would be normalised over 2 examples, where BatchNorm1d's outputs are +-1 whatever the inputs (and halves of 4
    still left a ResNet diverging)."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8)
    torch.testing.assert_close(norm(torch.randn(2, 8)).detach().abs(), torch.ones(2, 8), rtol=0, atol=1e-2)  # eps's
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = batches(1, n=n)[0]
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0)
    info = opt.step(x, y)
    assert (opt._half_difference is not None) == halved
    assert halved or info["signal"] == 0.0


@pytest.mark.parametrize("norm, n, ratio", [(True, 12, 0.25), (True, 2, 0.25), (False, 1, 0.5)])
def test_an_unhalved_batch_norm_batch_steps_a_quarter_of_the_models_step(norm, n, ratio):
    """A batch that batch norm normalises and signal scaling cannot halve (s never measured) takes a quarter of the
    quadratic model's step (the same step without signal scaling, same weights and batch; the output layer's noise
    damping, which reads s, off in both); a batch of one without batch norm half of it."""
    changes = []
    for scaling in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), *([nn.BatchNorm1d(8)] if norm else []), nn.Tanh(), nn.Linear(8, 3))
        x, y = batches(1, n=n)[0]
        opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0,
                                    reject_steps=False, signal_scaling=scaling, output_noise_damping=False)
        before = params(model)
        opt.step(x, y)
        changes.append([after - start for after, start in zip(params(model), before)])
    assert sum(float(plain.abs().sum()) for plain in changes[1]) > 0
    for scaled, plain in zip(*changes):
        torch.testing.assert_close(scaled, ratio * plain, rtol=1e-4, atol=1e-7)


def test_paper_preset_has_the_papers_settings():
    opt = kronograph.optim.KFAC(kronograph.compile(mlp(), (torch.randn(2, 5),)), preset="paper")
    assert opt.damping == 150.0 and opt.gamma == pytest.approx(math.sqrt(150.0))
    assert (opt.damping_every, opt.gamma_every, opt.inverse_every) == (5, 20, 20)
    assert (opt.stats_fraction, opt.qmodel_fraction) == (1 / 8, 1 / 4)
    assert opt.fisher == "mc" and opt.rescale and opt.momentum == "qmodel"
    assert opt.adapt_damping and opt.adapt_gamma and opt.lr == 1.0
    settings = PRESETS["paper"]
    assert settings.lm_acceleration == 1 and not settings.reject_steps and settings.refresh_ratio is None
    assert settings.min_stats_examples == 1 and settings.min_qmodel_examples == 1
    assert not settings.descent_only and settings.max_condition is None and not settings.centered_damping
    assert settings.max_momentum is None and settings.factor_damping_floor == 0 and opt.curvature.floor == 0
    assert settings.unmatched_direction == "gradient"
    assert settings.activation_rows is None and opt.row_subset is None  # A from every row
    assert PRESETS["default"].activation_rows == 1024
    assert settings.max_factor_dim is None and opt.curvature.max_dim is None  # every factor inverted whole
    assert not settings.shared_statistics_forward and PRESETS["default"].shared_statistics_forward
    assert PRESETS["default"].max_factor_dim == 1024


def test_paper_preset_is_the_papers_algorithm_step_for_step():
    """The preset against the paper's settings given one by one with every first-try addition switched off,
    through LM (steps 5, 10, ...) and the gamma rule (step 20)."""
    runs = []
    for kwargs in ({"preset": "paper"},
                   {**PAPER_ARGUMENTS, "min_stats_examples": 1, "min_qmodel_examples": 1, "lm_acceleration": 1,
                    "refresh_ratio": None, "reject_steps": False, "keep_damping_at_rounding": False,
                    "descent_only": False, "max_momentum": None,
                    "max_condition": None, "centered_damping": False, "unmatched_direction": "gradient",
                    "signal_scaling": False, "activation_rows": None}):
        model = mlp()
        opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=3, **kwargs)
        runs.append(([opt.step(x, y) for x, y in batches(22)], params(model)))
    (infos_a, theta_a), (infos_b, theta_b) = runs
    assert [i["loss"] for i in infos_a] == [i["loss"] for i in infos_b]
    assert [i["factor_damping"] for i in infos_a] == [i["factor_damping"] for i in infos_b]
    assert all(torch.equal(p, q) for p, q in zip(theta_a, theta_b))
    assert infos_a[-1]["damping"] != 150.0 and infos_a[19]["factor_damping"] != infos_a[18]["factor_damping"]


def test_unmatched_parameters_step_along_the_gradient_over_its_root_mean_square():
    """The unmatched parameters' change is unmatched_scale * -g / sqrt(v), with g recomputed here by autograd
    on a copy of the model and v = g_1^2, then 0.999 v + 0.001 g^2 (momentum off to isolate the direction)."""
    model = normed_mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=0, momentum=None,
                                reject_steps=False, signal_scaling=False, unmatched_direction="rms")
    names = ["1.weight", "1.bias"]
    assert sorted(opt.unmatched) == sorted(names)
    v: dict[str, torch.Tensor] = {}
    moved = 0
    for x, y in batches(8):
        probe = copy.deepcopy(model).double()
        nn.functional.cross_entropy(probe(x.double()), y).backward()
        grads = {name: dict(probe.named_parameters())[name].grad for name in names}
        v = {name: g.square() if name not in v else 0.999 * v[name] + 0.001 * g.square() for name, g in grads.items()}
        before = {name: p.detach().double().clone() for name, p in model.named_parameters() if name in names}
        info = opt.step(x, y)
        after = {name: p.detach().double() for name, p in model.named_parameters() if name in names}
        for name in names:
            expected = -info["unmatched_scale"] * grads[name] / v[name].sqrt()
            torch.testing.assert_close(after[name] - before[name], expected, rtol=1e-3, atol=1e-6)
        moved += info["unmatched_scale"] > 0
    assert moved >= 4  # the check is not vacuous: the direction was taken on most steps


def _unmatched_held_at_zero(opt) -> list[int]:
    """Bound ``opt``'s unmatched coefficient to [0, 0] in its quadratic model (a bound that holds, as
    ``descent_only``'s does where the direction is of no use) and return the list that collects, a step, how many
    directions the model's first products took."""
    counts: list[int] = []
    gram, bounds = opt._fisher_gram, opt._coefficient_bounds

    def counted(inputs, directions, cache):
        if "outputs" not in cache:  # (the gamma rule's other candidates reuse the first one's tangents)
            counts.append(len(directions))
        return gram(inputs, directions, cache)

    def held(labels):
        return [(0.0, 0.0) if label == "unmatched_scale" else bound for label, bound in zip(labels, bounds(labels))]

    opt._fisher_gram, opt._coefficient_bounds = counted, held
    return counts


def test_an_unmatched_direction_held_at_zero_is_left_out_of_the_model_and_changes_nothing():
    """``unmatched_backoff`` (N = 4 here): after N zero coefficients in a row the unmatched direction is left out of
    the quadratic model for N steps, then tried again; the model then has one direction fewer, and the weights are
    those of the run that keeps the direction every step (a coefficient at its bound adds nothing), to rounding.
    The count-down is part of the state: a resumed run leaves out the same steps."""
    data = batches(24)
    runs = []
    for backoff in (4, None):
        model = normed_mlp()
        opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=0, unmatched_backoff=backoff,
                                    factor_dtype=torch.float64, unmatched_direction="rms", batches_per_step=1)
        counts = _unmatched_held_at_zero(opt)
        infos = [opt.step(x, y) for x, y in data[:12]]
        state = copy.deepcopy(opt.state_dict()), {k: v.clone() for k, v in model.state_dict().items()}
        infos += [opt.step(x, y) for x, y in data[12:]]
        runs.append((counts, infos, params(model), state))
    (counts, infos, theta, (state, weights)), (every_counts, every_infos, every_theta, _) = runs
    assert all(info["unmatched_scale"] == 0 for info in infos + every_infos)
    taken = [step for step, count in enumerate(counts, start=1) if count == (2 if step == 1 else 3)]
    assert taken == [1, 2, 3, 4, 9, 14, 19, 24]
    assert all(count == 2 for step, count in enumerate(counts[1:], start=2) if step not in taken)
    assert every_counts == [2] + [3] * 23
    assert [i["loss"] for i in infos] == pytest.approx([i["loss"] for i in every_infos], rel=1e-4)
    for p, q in zip(theta, every_theta):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    model = normed_mlp(seed=5)
    model.load_state_dict(weights)
    resumed = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=1, unmatched_backoff=4,
                                    factor_dtype=torch.float64, unmatched_direction="rms", batches_per_step=1)
    resumed_counts = _unmatched_held_at_zero(resumed)
    resumed.load_state_dict(state)
    assert resumed.unmatched_rest == 1  # step 9 left out 4: 10-12 done, 13 to come
    for x, y in data[12:]:
        resumed.step(x, y)
    assert resumed_counts == counts[12:]
    assert all(torch.equal(p, q) for p, q in zip(params(model), theta))


@pytest.mark.parametrize("max_factor_dim", [1024, 2])
def test_default_preset_resumes_exactly(max_factor_dim):
    """Also with the factors inverted in blocks (max_factor_dim 2), whose inverses are multiplied block by block: the
    resumed run's inverses say the same blocks."""
    data = batches(12)
    model = normed_mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=0, max_factor_dim=max_factor_dim)
    assert opt.unmatched  # the RMS moments of the unmatched parameters are part of the state
    for x, y in data[:6]:
        opt.step(x, y)
    state = copy.deepcopy(opt.state_dict())  # the live factors are folded in place by later steps
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    tail = [opt.step(x, y)["loss"] for x, y in data[6:]]
    other = normed_mlp(seed=5)
    other.load_state_dict(weights)
    resumed = kronograph.optim.KFAC(kronograph.compile(other, (torch.randn(2, 5),)), seed=1,
                                    max_factor_dim=max_factor_dim)
    resumed.load_state_dict(state)
    saved = {name: (block.inverses.a_blocks, block.inverses.g_blocks) for name, block in resumed.blocks.items()}
    assert saved == {name: (b["a_blocks"], b["g_blocks"]) for name, b in state["curvature"]["blocks"].items()}
    assert any(blocks != (None, None) for blocks in saved.values()) == (max_factor_dim == 2)
    assert [resumed.step(x, y)["loss"] for x, y in data[6:]] == tail


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))


def test_a_from_a_subset_of_the_rows_resumes_exactly_and_differs_from_every_row():
    """A conv of 16 patch rows an example, A from at most 40 of a batch's 512: the rows' own generator is part of
    the state (a resumed run draws the same rows), and the factors are not those of every row."""
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randn(32, 1, 4, 4, generator=generator), torch.randint(0, 3, (32,), generator=generator))
            for _ in range(10)]
    model = conv_net()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 1, 4, 4),)), seed=0, activation_rows=40)
    every = kronograph.optim.KFAC(kronograph.compile(conv_net(), (torch.randn(2, 1, 4, 4),)), seed=0,
                                  activation_rows=None)
    for x, y in data[:5]:
        opt.step(x, y)
        every.step(x, y)
    assert not torch.allclose(opt.blocks["0"].a, every.blocks["0"].a, rtol=1e-3)
    # 16 rows an example, to float32 rounding of the rows' weights (k of R rows weighted R / k)
    torch.testing.assert_close(opt.blocks["0"].a[0, -1, -1], every.blocks["0"].a[0, -1, -1], rtol=1e-4, atol=0)
    state = copy.deepcopy(opt.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    tail = [opt.step(x, y)["loss"] for x, y in data[5:]]
    other = conv_net(seed=5)
    other.load_state_dict(weights)
    resumed = kronograph.optim.KFAC(kronograph.compile(other, (torch.randn(2, 1, 4, 4),)), seed=1, activation_rows=40)
    resumed.load_state_dict(state)
    assert [resumed.step(x, y)["loss"] for x, y in data[5:]] == tail
    assert torch.equal(resumed.blocks["0"].a, opt.blocks["0"].a)  # the same rows drawn after the resume
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), model.parameters()))


def test_unknown_setting_and_preset_are_named():
    cm = kronograph.compile(mlp(), (torch.randn(2, 5),))
    with pytest.raises(kronograph.KronographError, match="unknown arguments"):
        kronograph.optim.KFAC(cm, dampening=1.0)
    with pytest.raises(kronograph.KronographError, match="preset"):
        kronograph.optim.KFAC(cm, preset="fast")


def test_command_line_preset_picks_the_presets_settings():
    from kronograph.cli.optimizers import make_optimizer, resolve_options

    paper = resolve_options("kfac", {"preset": "paper"})
    assert paper["damping"] == 150.0 and paper["damping_every"] == 5 and paper["gamma_every"] == 20
    assert resolve_options("kfac", {})["damping"] is None  # the default preset: relative to the curvature
    cm = kronograph.compile(mlp(), (torch.randn(2, 5),))
    opt = make_optimizer("kfac", cm, {"preset": "paper", "damping": 3.0}, seed=0)
    assert opt.damping == 3.0 and opt.damping_every == 5 and not opt.settings.reject_steps


@pytest.mark.parametrize("loss", ["cross_entropy", "sigmoid_cross_entropy"])
def test_a_batch_of_nans_is_skipped_without_reaching_the_weights(loss):
    """Sampled targets from non-finite outputs must not crash the statistics pass (multinomial and bernoulli
    refuse NaN probabilities); the step is skipped and the weights and factors stay as they were."""
    model = mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),), loss=loss), seed=0)
    x, y = batches(1)[0]
    y = y if loss == "cross_entropy" else torch.rand(len(y), 3)
    opt.step(x, y)
    before = params(model)
    factors = {name: block.a.clone() for name, block in opt.blocks.items()}
    with pytest.warns(Warning):
        info = opt.step(torch.full_like(x, float("nan")), y)
    assert "skipped" in info
    assert all(torch.equal(p, q) for p, q in zip(before, params(model)))
    assert all(torch.equal(block.a, factors[name]) for name, block in opt.blocks.items())


@pytest.mark.parametrize("n", [32, 3, 2])
def test_signal_share_is_the_halves_cross_product_against_the_whole_gradients(n):
    """After one step, signal_scaling's EMAs hold g^T P g and g^T P g - d^T P d: g_A, g_B the gradients of the
    batch's halves (the first n // 2 examples and the rest) recomputed here by autograd on a copy of the model, g
    their mean weighted by their sizes, d = (g_A - g_B) / 2, P the step's K-FAC inverse (the negated proposal map);
    for equal halves the second is g_A^T P g_B. The update is then (1 + s) / 2 of the one without signal scaling.
    Batches of 2 and 3 examples are halved too (halves of one example: no batch norm here)."""
    runs = {}
    for scaling in (True, False):
        model = mlp()
        probe = copy.deepcopy(model)
        opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=0, momentum=None,
                                    reject_steps=False, signal_scaling=scaling, output_noise_damping=False)
        (x, y), = batches(1)
        x, y = x[:n], y[:n]
        before = params(model)
        opt.step(x, y)
        runs[scaling] = (opt, [p - q for p, q in zip(params(model), before)])
    opt = runs[True][0]

    def gradient(xs, ys):
        probe.zero_grad()
        torch.nn.functional.cross_entropy(probe(xs), ys).backward()
        return {name: p.grad.clone() for name, p in probe.named_parameters()}

    half = n // 2
    g_a, g_b = gradient(x[:half], y[:half]), gradient(x[half:], y[half:])
    g = {name: (half * g_a[name] + (n - half) * g_b[name]) / n for name in g_a}
    d = {name: (g_a[name] - g_b[name]) / 2 for name in g_a}
    inverses = opt.curvature.current()

    def dot_p(u, v):  # u^T P v
        solved = opt.curvature.direction(v, inverses, {})
        return -sum(float((u[name] * solved[name]).sum()) for name in solved)

    total, cross = opt.signal
    assert total == pytest.approx(dot_p(g, g), rel=1e-4)
    assert cross == pytest.approx(dot_p(g, g) - dot_p(d, d), rel=1e-3, abs=1e-5 * total)
    if 2 * half == n:
        assert cross == pytest.approx(dot_p(g_a, g_b), rel=1e-3, abs=1e-5 * total)
    share = min(1.0, max(0.0, cross / total))
    for scaled, plain in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(scaled, (1 + share) / 2 * plain, rtol=1e-4, atol=1e-7)


def test_the_share_of_signal_is_measured_every_signal_every_steps_with_the_decay_of_as_many():
    """signal_every=3: the EMAs move (and the gradient is taken as two halves) at steps 1 (the first measure), 3, 6
    and 9 only, and a measure folds in with decay 0.9^3: the step's own (g^T P g, g^T P g - d^T P d) is read off
    a twin resumed from the same state that measures every step (decay 0.9), so ``after = 0.729 before + 0.271
    new``."""
    data = batches(9)
    model = mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=0, signal_every=3)
    moved, halved = [], []
    for step, (x, y) in enumerate(data, start=1):
        before, state, weights = opt.signal, copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
        opt.step(x, y)
        if opt.signal != before:
            moved.append(step)
        if opt._half_difference is not None:  # the other steps pass the batch whole
            halved.append(step)
        if step in (6, 9):
            twin_model = mlp(seed=4)
            twin_model.load_state_dict(weights)
            twin = kronograph.optim.KFAC(kronograph.compile(twin_model, (torch.randn(2, 5),)), seed=1, signal_every=1)
            twin.load_state_dict(state)
            twin.step(x, y)
            new = [(t - 0.9 * b) / 0.1 for t, b in zip(twin.signal, before)]
            assert opt.signal == pytest.approx([0.729 * b + 0.271 * n for b, n in zip(before, new)], rel=1e-6)
    assert moved == halved == [1, 3, 6, 9]


def test_a_batch_of_one_example_is_taken_as_all_noise():
    """A batch of one cannot be halved: its share of signal is unmeasured and taken as 0, so the update is half the
    one without signal scaling (``output_noise_damping`` off), and with it on the output layer's G is damped by its
    whole trace (R = 1 row). A later batch that can be halved measures s as usual."""
    runs = {}
    (x, y), = batches(1)
    for scaling in (True, False):
        model = mlp()
        opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=0, momentum=None,
                                    reject_steps=False, signal_scaling=scaling, output_noise_damping=False)
        before = params(model)
        info = opt.step(x[:1], y[:1])
        runs[scaling] = [p - q for p, q in zip(params(model), before)]
        assert info.get("signal") == (0.0 if scaling else None)
        assert opt.signal is None
    for scaled, plain in zip(runs[True], runs[False]):
        torch.testing.assert_close(scaled, plain / 2, rtol=1e-5, atol=1e-8)
    opt = kronograph.optim.KFAC(kronograph.compile(mlp(), (torch.randn(2, 5),)), seed=0)
    opt.step(x[:1], y[:1])
    assert opt._output_g_shares() == {"2": 1.0}
    info = opt.step(x[:4], y[:4])
    assert opt.signal is not None and info["signal"] == opt._signal_share()


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_batches_of_one_to_three_examples_do_not_diverge(batch):
    """Before signal scaling covered them, K-FAC's defaults fitted each batch of 1-3 examples and the loss on the
    data they came from rose from ~2 to 4-9 within 200 steps (a 20-32-5 ReLU net, labels of a linear rule). Now it
    falls, and never far above where it started."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 20, generator=generator)
    y = (x @ torch.randn(20, 5, generator=generator)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0)

    def loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x), y))

    start, worst = loss(), 0.0
    for step in range(200):
        index = torch.randint(512, (batch,), generator=generator)
        opt.step(x[index], y[index])
        if step % 20 == 19:
            worst = max(worst, loss())
    assert loss() < 0.75 * start and worst < 1.5 * start


def test_the_momentum_coefficient_stays_at_most_one_on_a_batch_of_a_few_examples():
    """``unit_momentum_below=8``: mu in [0, 1] on batches of fewer than 8 loss terms, in [0, max_momentum] from 8
    on, a sequence's tokens counting one each; every step's mu obeys it on random labels at batch 4, where mu goes
    above 1 without the bound. The paper preset keeps the free mu."""
    generator = torch.Generator().manual_seed(3)
    mus = {}
    for below in (8, None):
        opt = kronograph.optim.KFAC(kronograph.compile(mlp(), (torch.randn(2, 5),)),
                                    seed=0, unit_momentum_below=below, batches_per_step=1)
        mus[below] = []
        for _ in range(40):
            info = opt.step(torch.randn(4, 5, generator=generator), torch.randint(0, 3, (4,), generator=generator))
            mus[below].append(info["mu"])
            assert opt._coefficient_bounds(["alpha", "mu"]) == [(0.0, math.inf), (0.0, 1.0 if below else 2.0)]
        opt.step(torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator))
        assert opt._coefficient_bounds(["alpha", "mu"]) == [(0.0, math.inf), (0.0, 2.0)]
    assert all(0.0 <= mu <= 1.0 for mu in mus[8]) and max(mus[None]) > 1.0
    sequences = kronograph.optim.KFAC(kronograph.compile(mlp(), (torch.randn(2, 4, 5),)), seed=0, batches_per_step=1)
    sequences.step(torch.randn(2, 4, 5, generator=generator), torch.randint(0, 3, (2, 4), generator=generator))
    assert sequences._coefficient_bounds(["alpha", "mu"]) == [(0.0, math.inf), (0.0, 2.0)]  # 2 x 4 tokens
    assert PRESETS["paper"].unit_momentum_below is None and PRESETS["paper"].max_momentum is None


def test_the_statistics_floor_counts_the_tokens_of_a_sequence_loss():
    """64 loss terms at least: 32 sequences of 16 tokens need 4 of them (tau_1 = 1/8), 32 single labels all 32."""
    torch.manual_seed(0)
    sizes = []
    for shape in ((32, 16), (32,)):
        model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
        x = torch.randint(0, 10, shape)
        opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0,
                                    shared_statistics_forward=False)  # the whole batch's: on the gradient's forward
        sampled_pass = opt.engine.sampled_pass

        def spy(*args, **kwargs):
            records, n = sampled_pass(*args, **kwargs)
            sizes.append(n)
            return records, n

        opt.engine.sampled_pass = spy
        assert math.isfinite(opt.step(x, torch.randint(0, 10, shape))["loss"])
    assert sizes == [4, 32]


@pytest.mark.parametrize("shared", [True, False])
def test_whole_batch_statistics_on_the_gradients_forward_are_the_dense_factors(monkeypatch, shared):
    """Where the statistics take the whole batch, the sampled targets' backward runs on the gradient's own forward
    (its two halves' here, ``signal_scaling``) and no statistics pass of its own runs; the factors after the first
    step are the batch's, computed densely on a copy: A = mean of [x, 1][x, 1]^T, G = mean of g_i g_i^T with g_i the
    gradient of example i's loss at its sampled target (here made deterministic: the least likely class)."""
    model = mlp()
    probe = copy.deepcopy(model)
    x, y = batches(1, n=32)[0]
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0,
                                shared_statistics_forward=shared)
    monkeypatch.setattr(opt.loss, "sample_targets", lambda outputs, generator=None: outputs.detach().argmin(-1))
    passes = []
    sampled_pass = opt.engine.sampled_pass
    monkeypatch.setattr(opt.engine, "sampled_pass", lambda *a, **k: passes.append(1) or sampled_pass(*a, **k))
    opt.step(x, y)
    assert len(passes) == (0 if shared else 1)
    inputs = {"0": x.double(), "2": torch.tanh(probe[0](x)).detach().double()}
    least = probe.double()(x.double()).detach().argmin(-1)
    for name, layer in (("0", probe[0]), ("2", probe[2])):
        rows = torch.cat([inputs[name], torch.ones(32, 1, dtype=torch.float64)], dim=1)
        block = opt.curvature.blocks[name]
        torch.testing.assert_close(block.a[0].double(), rows.T @ rows / 32, rtol=1e-5, atol=1e-6)
        # g_i = d loss_i / d s_i is the bias's gradient of example i alone
        g = torch.stack([torch.autograd.grad(nn.functional.cross_entropy(probe(x[i:i + 1].double()), least[i:i + 1]),
                                             layer.bias)[0] for i in range(32)])
        torch.testing.assert_close(block.g[0].double(), g.T @ g / 32, rtol=1e-4, atol=1e-7)


def test_the_quadratic_models_products_are_differences_where_forward_mode_is_dear():
    """fisher_products="auto": one-sided differences for a transformer (forward mode would need attention's math
    kernel), a net with group norm (its tangent formula is dear), a GRU (forward mode leaves its fused kernel) and a
    CNN (a convolution's tangent is two convolutions),
    central ones wherever batch norm normalises by the batch (one-sided steps were worse at batch 8), forward
    mode for an MLP, for the batch-norm net in evaluation mode, and in the paper preset and in half precision; the
    detecting forward leaves the RNG and the running statistics as they were."""
    torch.manual_seed(0)
    attention = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Flatten(), nn.Linear(32, 3))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3))
    normed = nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    frozen_norm = copy.deepcopy(normed).eval()
    grouped = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
                            nn.Linear(64, 3))
    both = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Flatten(), nn.BatchNorm1d(32),
                         nn.Linear(32, 3))
    convolved = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))

    x, y = torch.randn(16, 4, 8), torch.randint(0, 3, (16,))
    chosen, seen = {}, {}
    for label, model, preset in (("attention", attention, "default"), ("mlp", mlp, "default"),
                                 ("batch norm", normed, "default"), ("batch norm, eval", frozen_norm, "default"),
                                 ("attention, paper", attention, "paper"), ("gru", Recurrent(6), "default"),
                                 ("group norm", grouped, "default"), ("attention, batch norm", both, "default"),
                                 ("convolution", convolved, "default")):
        opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), preset=preset, seed=0)
        assert opt.engine.resolved_products == (None if preset == "default" else "forward")  # auto: not yet decided
        state, buffers = torch.get_rng_state(), [b.clone() for b in model.buffers()]
        seen[label] = opt.engine._dear_for_forward_mode((x,))
        assert torch.equal(torch.get_rng_state(), state)
        assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
        assert math.isfinite(opt.step(x, y)["loss"])
        chosen[label] = opt.engine.resolved_products
    assert seen == {"attention": ["attention"], "mlp": [], "batch norm": ["batch norm in training mode"],
                    "batch norm, eval": [], "attention, paper": ["attention"], "gru": ["a recurrent layer"],
                    "group norm": ["a convolution", "group or instance norm"],
                    "attention, batch norm": ["attention", "batch norm in training mode"],
                    "convolution": ["a convolution"]}
    assert chosen == {"attention": "one-sided", "mlp": "forward", "batch norm": "differences",
                      "batch norm, eval": "forward", "attention, paper": "forward", "gru": "one-sided",
                      "group norm": "one-sided", "attention, batch norm": "differences", "convolution": "one-sided"}
    # bfloat16 weights round a difference's relative shift of 3e-4 away: forward mode
    half = copy.deepcopy(attention).to(torch.bfloat16)
    opt = kronograph.optim.KFAC(kronograph.compile(half, (x[:2].bfloat16(),), loss="cross_entropy"), seed=0)
    assert math.isfinite(opt.step(x.bfloat16(), y)["loss"]) and opt.engine.resolved_products == "forward"


def test_labels_with_the_classes_on_dim_1_are_refused_with_the_fix_that_trains():
    """A segmentation net's [N, C, H, W] scores against [N, H, W] labels (F.cross_entropy's layout): the step says
    to compile with the classes moved last, and that model trains."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    x = torch.rand(32, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    y = (3 * x[:, 0]).long().clamp(max=2)
    opt = kronograph.optim.KFAC(kronograph.compile(net, (x[:2],), loss="cross_entropy"), seed=0)
    with pytest.raises(kronograph.KronographError, match=r"output=lambda out: out\.movedim\(1, -1\)"):
        opt.step(x, y)
    opt = kronograph.optim.KFAC(kronograph.compile(net, (x[:2],), loss="cross_entropy",
                                                   output=lambda out: out.movedim(1, -1)), seed=0)
    losses = [opt.step(x, y)["loss"] for _ in range(10)]
    assert losses[-1] < 0.5 * losses[0]


def test_a_sparse_embedding_gradient_is_taken_dense():
    """nn.Embedding(sparse=True) gives a sparse .grad, on which the step's algebra failed at step 1: the gradient
    pass now returns its dense equal (that of the same weights with sparse=False), and K-FAC trains the model (the
    sparse table, which the capture does not record, steps as a parameter outside every block)."""
    tokens = torch.randint(0, 50, (64, 6), generator=torch.Generator().manual_seed(0))
    labels = tokens[:, 0] % 3

    def optimizer(sparse: bool):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Embedding(50, 8, sparse=sparse), nn.Flatten(), nn.Linear(48, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CoverageWarning)
            return kronograph.optim.KFAC(kronograph.compile(net, (tokens[:2],), loss="cross_entropy"), seed=0)

    sparse, dense = optimizer(True), optimizer(False)
    got = sparse.engine.gradient_pass((tokens,), labels, capture=False).grads
    want = dense.engine.gradient_pass((tokens,), labels, capture=False).grads
    assert not any(g.is_sparse for g in got.values()) and got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7)
    with pytest.warns(StatisticsWarning, match="an embedding with sparse=True"):
        losses = [sparse.step(tokens, labels)["loss"] for _ in range(10)]
    assert losses[-1] < 0.5 * losses[0]


class _Scaled(torch.autograd.Function):
    """x -> 2 x written the old way (forward with ctx, no setup_context): functorch's transforms refuse it."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class _ScaledByFunction(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Scaled.apply(x)


@pytest.mark.parametrize("middle", [
    lambda: nn.utils.parametrizations.weight_norm(nn.Linear(6, 8)),
    lambda: nn.Sequential(nn.Linear(6, 8), _ScaledByFunction()),
], ids=["weight norm", "autograd.Function"])
def test_auto_products_take_central_differences_where_pytorch_has_no_forward_mode(middle):
    """Weight norm's ``torch._weight_norm`` (like spectral norm's power iteration and ``embedding_bag``) has no
    forward-mode derivative, nor has a custom autograd.Function without setup_context: "auto" then takes central
    differences from its first step on, the steps of asking for them by name (the dropout masks the failed
    forward-mode pass drew are drawn again); forward mode asked for by name is refused with the fix."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=generator), torch.randint(0, 3, (64,), generator=generator)

    def run(products: str):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Dropout(0.2), middle(), nn.Tanh(), nn.Linear(8, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CoverageWarning)  # weight norm's g and v have no block
            opt = kronograph.optim.KFAC(kronograph.compile(net, (x[:2],), loss="cross_entropy"), seed=0,
                                        fisher_products=products)
        steps = [opt.step(x[16 * k:16 * (k + 1)], y[16 * k:16 * (k + 1)]) for k in range(4)]
        return opt, steps, [p.detach().clone() for p in net.parameters()]

    auto, auto_steps, auto_weights = run("auto")
    assert auto.engine.resolved_products == "differences"
    named, named_steps, named_weights = run("differences")
    for a, b in zip(auto_steps, named_steps):
        assert math.isfinite(a["loss"]) and (a["alpha"], a["mu"]) == (b["alpha"], b["mu"])
    for a, b in zip(auto_weights, named_weights):
        assert torch.equal(a, b)
    with pytest.raises(kronograph.KronographError, match="fisher_products='differences'"):
        run("forward")


@pytest.mark.parametrize("products,resolved,tolerance", [("auto", "one-sided", 1e-3),
                                                       ("differences", "differences", 1e-6)])
def test_the_differences_take_the_outputs_at_theta_from_the_gradient_pass_where_a_plain_forward_gives_them(
        products, resolved, tolerance):
    """Differences (one-sided, auto's choice here, and central) need the outputs at theta beside their shifted
    forwards: the gradient pass's (its halves' stacked) where that forward drew no random numbers and a
    whole-batch forward agrees (checked once).
    The step that takes them equals one with a forward of its own to rounding (only that step: after it, theta's
    float32 rounding alone moves the differences by ~1e-4 relative; one-sided differences divide the halves' and
    the whole batch's rounding of the outputs by the step h: ~1e-4 relative); dropout's outputs are not kept;
    batch norm's (other statistics on the halves, halved every step) are found to differ and never kept again;
    without batch norm a step that measures no s (``signal_every``) passes the batch whole, and outputs that
    couple the examples are then kept unchecked."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)

    def model(dropout: float = 0.0, norm: bool = False, centred: bool = False) -> nn.Module:
        torch.manual_seed(0)
        layers = [nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=True), nn.Flatten()]
        return nn.Sequential(*layers, *([nn.BatchNorm1d(32)] if norm else []),
                             *([BatchCentred()] if centred else []), nn.Linear(32, 3))

    def run(net: nn.Module, reuse: bool = True, expected: str = resolved, signal_every: int = 1):
        opt = kronograph.optim.KFAC(kronograph.compile(net, (x[:2],), loss="cross_entropy"), seed=0,
                                    fisher_products=products, signal_every=signal_every, batches_per_step=1)
        if not reuse:
            opt._keep_outputs = lambda n, halves: False
        g = torch.Generator().manual_seed(1)
        # "auto" chooses the products at step 1 and takes the pass's outputs (after checking them) from step 2;
        # products given from the start take them at step 1
        for _ in range(2 if products == "auto" else 1):
            index = torch.randperm(32, generator=g)[:16]  # batch norm's halves need 8 examples each
            info = opt.step(x[index], y[index])
            assert math.isfinite(info["loss"])
        assert opt.engine.resolved_products == expected
        return opt, info, [p.detach().clone() for p in net.parameters()]

    kept, info, with_reuse = run(model())
    assert kept._outputs_split_free is True
    fresh, info_fresh, without = run(model(), reuse=False)
    assert fresh._outputs_split_free is None
    assert (info["alpha"], info["mu"]) == pytest.approx((info_fresh["alpha"], info_fresh["mu"]),
                                                       rel=tolerance)
    for a, b in zip(with_reuse, without):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance / 10)
    dropped, _, _ = run(model(dropout=0.1))
    assert dropped._outputs_split_free is None  # never kept: each forward drew its masks
    assert dropped.engine.gradient_pass((x,), y, capture=False, keep_outputs=True).outputs is None
    normed, _, _ = run(model(norm=True), expected="differences", signal_every=4)  # batch norm: central ones
    assert normed._outputs_split_free is False and normed._half_difference is not None  # (halved every step)
    # outputs that couple the examples without batch norm: halved only on the steps that measure s
    whole, _, _ = run(model(centred=True), signal_every=4)
    fresh, _, _ = run(model(centred=True), reuse=False, signal_every=4)

    def no_forward_at_theta(inputs):
        raise AssertionError("the whole pass's outputs were not reused")

    whole.engine.outputs = no_forward_at_theta
    infos = [opt.step(x[16:], y[16:]) for opt in (whole, fresh)]  # step 2 or 3: no s measured, the batch whole
    assert whole._half_difference is None
    assert (infos[0]["alpha"], infos[0]["mu"]) == pytest.approx((infos[1]["alpha"], infos[1]["mu"]), rel=1e-6)
    for a, b in zip(whole.module.parameters(), fresh.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class BatchCentred(nn.Module):
    """Each feature less its mean over the batch: outputs that depend on how the batch is split."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0)


@pytest.mark.parametrize("layer", ["dropout", "batch_norm"])
def test_h_after_a_step_is_measured_with_the_gradient_passes_masks_and_parts(layer):
    """rho and the undo rule compare h after the step with h before it, which the gradient passes measured on
    the batch's halves with their own dropout masks (batch norm: each half's statistics). A step too small to
    move a float32 weight (lr = 1e-30) must find h exactly where it was: the same masks and parts, and the global
    generators left where they were. (A fresh whole-batch forward drew new masks: its h differed by the masks'
    noise, which undid every step of a dropout net once its loss was small.)"""
    torch.manual_seed(0)
    middle = nn.Dropout(0.5) if layer == "dropout" else nn.BatchNorm1d(16)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), middle, nn.Linear(16, 3))
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(4, 5),), loss="cross_entropy"), lr=1e-30,
                                seed=0, batches_per_step=1)
    measured = []
    objective = opt._objective

    def spy(inputs, y):
        state = torch.get_rng_state()
        value = objective(inputs, y)
        assert torch.equal(torch.get_rng_state(), state)
        measured.append(value)
        return value

    opt._objective = spy
    for x, y in batches(6, n=30):
        info = opt.step(x, y)
        assert measured[-1] == pytest.approx(info["loss"], rel=1e-6, abs=0)
    assert opt.rejected == 0 and len(measured) == 6


def test_the_defaults_keep_each_factors_damping_above_a_thousandth_of_its_scale():
    """With gamma far below the factors' scale (1e-12), the inverses a default step uses are those of each factor
    damped by a thousandth of its mean eigenvalue (dense inverses of the block's own factors)."""
    model = mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy"), seed=0,
                                adapt_gamma=False, factor_damping=1e-12, centered_damping=False,
                                output_noise_damping=False)
    assert opt.settings.factor_damping_floor == 1e-3
    for x, y in batches(2):
        opt.step(x, y)
    for block in opt.curvature.blocks.values():
        for factor, inverse in ((block.a[0], block.inverses.a_inv[0]), (block.g[0], block.inverses.g_inv[0])):
            m = factor.double()
            expected = torch.linalg.inv(m + 1e-3 * float(m.trace()) / len(m) * torch.eye(len(m), dtype=m.dtype))
            # float32 inverses of a matrix whose condition the floor caps near 1e3: ~1e-4 of its largest entry
            torch.testing.assert_close(inverse.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("bound", [True, False])
def test_no_step_is_predicted_to_take_h_below_zero_by_more_than_three_times_h(bound):
    """Labels that a saturated softmax calls least likely (logits x30): the Fisher of such a batch nearly vanishes
    while its gradient does not, and with lambda held at 1e-8 the quadratic model predicts falls of 20x h. The
    default (``bound_model_decrease``) shortens such a step until its predicted fall is h / (1/4) (``lr`` (2 - lr)
    of it applied), and the loss stays below its start (11.6 -> 6.5, 3.6, 4.6); without it, it rises 30-fold in three
    steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight.mul_(30)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 5, generator=generator)
    with torch.no_grad():
        y = model(x).argmin(1)
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0, damping=1e-8,
                                adapt_damping=False, adapt_gamma=False, factor_damping=1e-4,
                                bound_model_decrease=bound, max_logit_change=None)  # (that bound alone)
    assert PRESETS["default"].bound_model_decrease and not PRESETS["paper"].bound_model_decrease
    losses, falls = [], []
    for _ in range(3):
        info = opt.step(x, y)
        losses.append(info["loss"])
        falls.append(-info["model_decrease"])
    with torch.no_grad():
        final = float(get_loss("cross_entropy")(model(x), y))
    if bound:
        assert all(fall <= 4 * loss * (1 + 1e-9) for fall, loss in zip(falls, losses))
        assert max(*losses[1:], final) < losses[0]
    else:
        assert max(fall / loss for fall, loss in zip(falls, losses)) > 20 and final > 30 * losses[0]


def _spreads(logits: torch.Tensor) -> torch.Tensor:
    return logits.amax(dim=-1) - logits.amin(dim=-1)


def _logit_change_ratios(model: nn.Module, before: dict, x: torch.Tensor, bound: float,
                         cap: float = math.inf) -> torch.Tensor:
    """Each row's spread max_c - min_c of J delta (delta the weights' change since ``before``; the exact forward-mode
    product of torch.func at the weights before the step) over its room: the spread of the row's logits there,
    at most ``cap`` and at least ``bound``."""
    change, logits = _change_and_logit_spreads(model, before, x)
    return change / logits.clamp(max=cap).clamp(min=bound)


def _change_and_logit_spreads(model: nn.Module, before: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    delta = {name: param.detach() - before[name] for name, param in model.named_parameters()}
    logits, change = torch.func.jvp(lambda params: torch.func.functional_call(model, params, (x,)), (before,),
                                    (delta,))
    return _spreads(change), _spreads(logits)


@pytest.mark.parametrize("bound", [2.0, None])
def test_no_step_moves_a_rows_softmax_logits_by_more_than_max_logit_change(bound):
    """50 classes from a ReLU net at PyTorch's initialisation, lambda held at 1e-8: the quadratic model's step moves
    a row's logits by tens of nats (the Fisher cannot see a class of probability ~0 rise). With the bound no row's
    linearised change (torch.func's J delta of the step taken, not the optimizer's own products) exceeds the larger
    of 2 nats and the spread of its logits, and ``info["logit_change"]`` says so; without it (the paper's), the
    first step moves some row by more than 10x that."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 50))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=generator), torch.randint(50, (64,), generator=generator)
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0, damping=1e-8,
                                adapt_damping=False, reject_steps=False, max_logit_change=bound, batches_per_step=1)
    assert PRESETS["default"].max_logit_change == 10 and PRESETS["paper"].max_logit_change is None
    for _ in range(3):
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        info = opt.step(x, y)
        if bound is None:
            assert float(_logit_change_ratios(model, before, x, 2.0).max()) > 10 and "logit_change" not in info
            return
        if opt.steps == 1:  # the most room a row gets: the first step's largest spread (the 64 rows are all used)
            logits = torch.func.functional_call(model, before, (x,))
            assert opt.initial_logit_spread == pytest.approx(float(_spreads(logits).max()))
        largest = float(_logit_change_ratios(model, before, x, 2.0, opt.initial_logit_spread).max())
        assert largest <= 1 + 1e-4 and info["logit_change"] <= 1
    assert info["logit_change"] == pytest.approx(1.0)  # the bound is what shortened these steps


def test_the_logit_bound_leaves_a_step_within_it_as_the_model_solved_it():
    """A bound far above the steps' changes (1e6 nats) changes nothing: the weights after 4 steps equal those
    without a bound bit for bit, and ``info["logit_change"]`` is the step's own largest change over 1e6."""
    weights = []
    for bound in (1e6, None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 5))
        generator = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 6, generator=generator), torch.randint(5, (64,), generator=generator)
        opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0,
                                    max_logit_change=bound, batches_per_step=1)
        for _ in range(4):
            before = {name: param.detach().clone() for name, param in model.named_parameters()}
            info = opt.step(x, y)
            if bound is not None and not info.get("rejected"):
                largest = float(_logit_change_ratios(model, before, x, bound).max())
                assert 0 < info["logit_change"] == pytest.approx(largest, rel=1e-3)
        weights.append([param.detach().clone() for param in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_a_row_whose_logits_already_spread_widely_may_move_by_that_spread():
    """Logits x30 (a spread of ~100 nats a row, as a tied LM's N(0, 1) table gives its head): with a 2-nat bound
    the steps still move some row by far more than 2 nats (the bound is the rows' own spread there), and no row
    by more than its spread."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 50))
    with torch.no_grad():
        model[2].weight.mul_(30)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=generator), torch.randint(50, (64,), generator=generator)
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0,
                                reject_steps=False, max_logit_change=2.0)
    moved = []
    for _ in range(3):
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        opt.step(x, y)
        change, logits = _change_and_logit_spreads(model, before, x)
        assert bool((change <= logits.clamp(max=opt.initial_logit_spread, min=2.0) * (1 + 1e-4)).all())
        moved.append(float(change.max()))
    assert max(moved) > 10


def test_a_rows_room_is_capped_at_the_largest_spread_of_the_first_step():
    """Logits that spread past the first step's (the head x30 after step 1, as training sharpens a model) give no
    row more room than the first step's largest spread: a bag-of-words model's rows spread past 10 nats as it
    learns, and a bound that grew with them let the steps that raise p ~ 0 classes back in. With lambda held at
    1e-8 the steps are shortened (``info["logit_change"]`` 1), some row moves by the cap and none by more, while
    the rows' spreads are many times it. The cap is part of the state (exact resume)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 50))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=generator), torch.randint(50, (64,), generator=generator)
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), seed=0, damping=1e-8,
                                adapt_damping=False, reject_steps=False, max_logit_change=0.1, batches_per_step=1)
    first = float(_spreads(model(x).detach()).max())
    opt.step(x, y)
    assert opt.initial_logit_spread == pytest.approx(first) and 0.1 < first < 5
    with torch.no_grad():
        model[2].weight.mul_(30)
    for _ in range(2):
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        info = opt.step(x, y)
        change, logits = _change_and_logit_spreads(model, before, x)
        assert info["logit_change"] == pytest.approx(1.0) and float(logits.min()) > 5 * first
        assert float(change.max()) == pytest.approx(first, rel=1e-3)
    resumed = kronograph.optim.KFAC(kronograph.compile(copy.deepcopy(model), (x[:2],), loss="cross_entropy"),
                                    seed=0, batches_per_step=1)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.initial_logit_spread == opt.initial_logit_spread


@pytest.mark.parametrize("bound", [0.25, None])
def test_no_step_moves_a_sigmoids_logit_by_more_than_max_logit_change(bound):
    """Fifty sigmoid outputs (tags) of a ReLU net, lambda held at 1e-8: each output is the softmax over (0, s), so
    its change is |ds| (torch.func's J delta of the step taken) and its room |s|, capped at the first step's largest
    |s|, at least 0.25 nats. With the bound no output exceeds its room and some step was shortened; without it (the
    paper's) the first step moves some output by more than 4x its room."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 50))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=generator)
    y = (torch.rand(64, 50, generator=generator) < 0.05).float()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="sigmoid_cross_entropy"), seed=0,
                                damping=1e-8, adapt_damping=False, reject_steps=False, max_logit_change=bound)
    first = float(model(x).detach().abs().max())
    shortened = 0
    for _ in range(3):
        before = {name: param.detach().clone() for name, param in model.named_parameters()}
        info = opt.step(x, y)
        delta = {name: param.detach() - before[name] for name, param in model.named_parameters()}
        logits, change = torch.func.jvp(lambda params: torch.func.functional_call(model, params, (x,)), (before,),
                                        (delta,))
        room = logits.abs().clamp(max=first).clamp(min=0.25)
        if bound is None:
            assert float((change.abs() / room).max()) > 4 and "logit_change" not in info
            return
        assert opt.initial_logit_spread == pytest.approx(first)
        assert float((change.abs() / room).max()) <= 1 + 1e-4
        shortened += info["logit_change"] == pytest.approx(1.0)
    assert shortened


def test_losses_without_logits_have_no_logit_bound():
    """mse's quadratic model is exact in the outputs: nothing to bound, no ``logit_change`` reported."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(32, 6)
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="mse"), seed=0, max_logit_change=1e-6)
    info = opt.step(x, torch.randn(32, 3))
    assert "logit_change" not in info and info["alpha"] != 0


@pytest.mark.parametrize("positions", [1, 4])
def test_the_output_layers_g_is_damped_by_the_noisy_share_of_one_rows_weight(positions):
    """With gamma far below the factors' scale (1e-12), the inverses K-FAC forms are the dense inverses of each
    float64 factor M damped by 1e-3 tr M / dim, except the output layer's G: by max(1e-3 tr G / dim,
    (1 - s) tr G / R), s the share of signal the optimizer has measured, R the batch's rows of that layer (32
    examples times ``positions``). The paper preset has no such term; without signal_scaling there is none."""
    model = mlp()
    shape = (2, 5) if positions == 1 else (2, positions, 5)
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(shape),), loss="cross_entropy"), seed=0,
                                adapt_gamma=False, factor_damping=1e-12, centered_damping=False,
                                factor_dtype=torch.float64)
    assert opt.settings.output_noise_damping and not PRESETS["paper"].output_noise_damping
    assert opt.output_layers == {"2"}
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):  # random labels: the batch's gradient mostly noise
        opt.step(torch.randn(32, *shape[1:], generator=generator),
                 torch.randint(0, 3, (32, *shape[1:-1]), generator=generator))
    noise = 1 - opt._signal_share()
    assert noise > 0.1
    for name, inverses in opt._invert(1e-12).items():
        block = opt.curvature.blocks[name]
        for which, factor, inverse in (("a", block.a[0], inverses.a_inv[0]), ("g", block.g[0], inverses.g_inv[0])):
            trace, dim = float(factor.trace()), len(factor)
            damping = 1e-3 * trace / dim
            if name == "2" and which == "g":
                assert noise / (32 * positions) > 1e-3 / dim  # the term decides
                damping = noise * trace / (32 * positions)
            torch.testing.assert_close(inverse, torch.linalg.inv(factor + damping * torch.eye(dim, dtype=factor.dtype)),
                                       rtol=1e-9, atol=0)
    unmeasured = kronograph.optim.KFAC(opt.compiled, seed=0, signal_scaling=False)
    unmeasured.step(torch.randn(32, *shape[1:], generator=generator),
                    torch.randint(0, 3, (32, *shape[1:-1]), generator=generator))
    assert unmeasured._output_g_shares() is None


def test_a_layer_with_a_factor_wider_than_max_kronecker_dim_steps_outside_every_block():
    """max_kronecker_dim=8: the first layer (A 6, G 8 wide) keeps its block, the second (A 9 wide) is named in a
    CoverageWarning and its weight and bias step as the parameters outside every block (they move, finitely). The
    default bound is 8192 and the paper preset has none."""
    model = mlp()
    compiled = kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy")
    first, second = compiled.layers
    with pytest.warns(CoverageWarning, match=rf"layer {re.escape(repr(second.name))} has a 9-wide A factor .*"
                                             r"max_kronecker_dim=8"):
        opt = kronograph.optim.KFAC(compiled, seed=0, max_kronecker_dim=8)
    assert list(opt.curvature.blocks) == [first.name]
    assert set(opt.unmatched) == {second.weight, second.bias}
    before = params(model)
    for x, y in batches(3):
        info = opt.step(x, y)
    assert math.isfinite(info["loss"])
    for old, new in zip(before, model.parameters()):
        assert not torch.equal(old, new) and torch.isfinite(new).all()
    assert PRESETS["default"].max_kronecker_dim == 8192 and PRESETS["paper"].max_kronecker_dim is None


def _assert_block_diagonal_inverse(inverse: torch.Tensor, factor: torch.Tensor, sizes: list[int]) -> None:
    """``inverse`` is 0 off the contiguous diagonal blocks ``sizes`` and each of its blocks inverts the factor's block
    damped by the one value that makes it so (read off the first block, the same for every block: one damping)."""
    start, damping = 0, None
    for size in sizes:
        block = slice(start, start + size)
        eye = torch.eye(size, dtype=torch.float64)
        piece = factor[block, block].double()
        if damping is None:
            damping = float(torch.linalg.inv(inverse[block, block]).diagonal().mean() - piece.diagonal().mean())
        torch.testing.assert_close(inverse[block, block], torch.linalg.inv(piece + damping * eye), rtol=1e-9, atol=0)
        outside = inverse[block].clone()
        outside[:, block] = 0
        assert torch.count_nonzero(outside) == 0
        start += size


@pytest.mark.parametrize("optimizer", ["kfac", "preconditioner"])
def test_factors_wider_than_max_factor_dim_are_inverted_block_diagonally(optimizer):
    """A 6-wide A (5 inputs and the bias) and an 8-wide G in blocks of at most 4: [3, 3] and [4, 4]; the step uses
    those inverses, both in KFAC and in KFACPreconditioner."""
    model = mlp()
    compiled = kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy")
    loss = get_loss("cross_entropy")
    if optimizer == "kfac":
        opt = kronograph.optim.KFAC(compiled, seed=0, max_factor_dim=4, centered_damping=False,
                                    factor_dtype=torch.float64)
        for x, y in batches(2):
            opt.step(x, y)
        blocks = opt.curvature.blocks
    else:
        precond = kronograph.optim.KFACPreconditioner(compiled, max_factor_dim=4, seed=0, factor_dtype=torch.float64)
        for x, y in batches(2):
            model.zero_grad()
            with precond.track():
                loss(model(x), y).backward()
            precond.step()
        blocks = precond.blocks
    first = blocks[compiled.layers[0].name]
    _assert_block_diagonal_inverse(first.inverses.a_inv[0], first.a[0], [3, 3])
    _assert_block_diagonal_inverse(first.inverses.g_inv[0], first.g[0], [4, 4])
    last = blocks[compiled.layers[1].name]
    _assert_block_diagonal_inverse(last.inverses.a_inv[0], last.a[0], [3, 3, 3])
    _assert_block_diagonal_inverse(last.inverses.g_inv[0], last.g[0], [3])


@pytest.mark.parametrize("centered", [False, True])
def test_block_diagonal_inverses_multiply_by_their_blocks_as_the_dense_matrices_do(centered):
    """A 10-wide A (9 inputs and the homogeneous 1) and a 7-wide G in blocks of at most 4: the inverses say their
    blocks ([3, 3, 3] of a centred A's covariance, whose last row and column stay dense; [4, 4, 2] uncentred; [4, 3]
    of G) and the solve, which reads those blocks alone, equals the dense matrices' product on every group."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(2, 50, 9) + 3.0, torch.ones(2, 50, 1)], dim=-1)  # inputs far from zero mean
    q = torch.randn(2, 50, 7)
    a, g = x.transpose(1, 2) @ x / 50, q.transpose(1, 2) @ q / 50
    inverses = factored_inverses(a.double(), g.double(), 0.3, centered=centered, max_dim=4)
    assert inverses.a_blocks == ((3, 3, 3) if centered else (4, 4, 2)) and inverses.g_blocks == (4, 3)
    if centered:  # the border: the homogeneous coordinate couples to every input
        assert torch.count_nonzero(inverses.a_inv[:, -1, :-1]) == 2 * 9
    grad = torch.randn(2, 7, 10, dtype=torch.float64)
    dense = inverses.g_inv @ grad @ inverses.a_inv
    torch.testing.assert_close(precondition(grad, inverses), dense, rtol=1e-12, atol=1e-12)
    whole = factored_inverses(a.double(), g.double(), 0.3, centered=centered, max_dim=None)
    assert whole.a_blocks is None and whole.g_blocks is None


def test_a_blocked_factor_whose_centring_fails_is_inverted_in_the_blocks_its_statistics_formed():
    """A centred A's statistics form its covariance's blocks and its border (``inverse_blocks(..., border=True)``);
    were centring to fail (the corner, the ones column's count, not positive), the uncentred inversion reads the same
    blocks, the corner one more ([3, 3, 3, 1], not an uncentred A's [4, 4, 2]), never the entries left unformed: the
    garbage put there reaches nothing."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(1, 50, 9) + 3.0, torch.ones(1, 50, 1)], dim=-1)
    a = (x.transpose(1, 2) @ x / 50).double()
    a[:, -1, -1] = 0.0  # centring fails
    formed = torch.zeros(10, 10, dtype=torch.bool)
    for start in (0, 3, 6):
        formed[start:start + 3, start:start + 3] = True
    formed[-1, :] = formed[:, -1] = True
    garbage = torch.where(formed, a[0], torch.full_like(a[0], 1e6))[None]
    g = torch.eye(3, dtype=torch.float64)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no failure: the blocks are positive definite once damped
        inverses = factored_inverses(garbage, g, 0.3, centered=True, max_dim=4)
    assert inverses.a_blocks == (3, 3, 3, 1)
    _assert_block_diagonal_inverse(inverses.a_inv[0], a[0], [3, 3, 3, 1])
    grad = torch.randn(1, 3, 10, dtype=torch.float64)
    torch.testing.assert_close(precondition(grad, inverses), inverses.g_inv @ grad @ inverses.a_inv,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("centered", [True, False])
def test_statistics_of_the_blocks_alone_take_the_steps_of_whole_statistics(centered):
    """With factors wider than max_factor_dim, the statistics form only the diagonal blocks each inversion reads (a
    centred A's inner blocks and its border; an uncentred A's blocks over its whole width; G's): the run's losses and
    weights are those of the same run forming whole factors, to rounding, and the blocks' entries are the whole
    factors' there."""
    runs = []
    for whole in (False, True):
        model = mlp()
        opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=0, max_factor_dim=4,
                                    centered_damping=centered, factor_dtype=torch.float64)
        first = opt.curvature.blocks[opt.compiled.layers[0].name]
        assert first.statistics_blocks == (((3, 2) if centered else (3, 3)), (4, 4))
        if whole:
            for block in opt.curvature.blocks.values():
                block.statistics_blocks = (None, None)
        losses = [opt.step(x, y)["loss"] for x, y in batches(12)]
        runs.append((losses, params(model), first.a[0].clone(), first.g[0].clone()))
    (blocked, theta_b, a_b, g_b), (whole, theta_w, a_w, g_w) = runs
    assert blocked == pytest.approx(whole, rel=1e-9)
    for p, q in zip(theta_b, theta_w):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    for start, width in ((0, 3), (3, 2) if centered else (3, 3)):
        torch.testing.assert_close(a_b[start:start + width, start:start + width],
                                   a_w[start:start + width, start:start + width], rtol=1e-12, atol=1e-12)
    if centered:  # the border: the mean input and the count
        torch.testing.assert_close(a_b[-1], a_w[-1], rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(a_b[:3, 3:5]) == 0 and torch.count_nonzero(g_b[:4, 4:]) == 0  # never formed
    torch.testing.assert_close(g_b[:4, :4], g_w[:4, :4], rtol=1e-12, atol=1e-12)


def test_the_preconditioners_blocked_statistics_take_the_steps_of_whole_statistics():
    """KFACPreconditioner forms its batch factors' diagonal blocks alone too (batch_factors): an SGD loop's weights
    equal those of the loop whose factors are formed whole (float64 factors, to 1e-9)."""
    runs = []
    for whole in (False, True):
        model = mlp()
        compiled = kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy")
        precond = kronograph.optim.KFACPreconditioner(compiled, max_factor_dim=4, seed=0, factor_dtype=torch.float64)
        assert precond.blocks[compiled.layers[0].name].statistics_blocks == ((3, 3), (4, 4))  # A damped uncentred
        if whole:
            for block in precond.blocks.values():
                block.statistics_blocks = (None, None)
        sgd, loss = torch.optim.SGD(model.parameters(), lr=0.1), get_loss("cross_entropy")
        for x, y in batches(6):
            sgd.zero_grad()
            with precond.track():
                loss(model(x), y).backward()
            precond.step()
            sgd.step()
        runs.append(params(model))
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_a_model_mostly_outside_the_kronecker_blocks_is_said_to_be():
    """nn.Bilinear's weight has no block (its product with two inputs is no linear layer's): where such parameters
    hold most of the model, constructing K-FAC warns, naming the largest and why it has none; an MLP and a GRU,
    whose maps have blocks, do not."""

    class Pairs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair, self.head = nn.Bilinear(4, 4, 32), nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.pair(x[:, :4], x[:, 4:])))

    torch.manual_seed(0)
    with pytest.warns(CoverageWarning, match=r"544 of the model's 643 parameters \(85%\).*pair\.weight: not a "
                                             r"linear, convolution or embedding weight"):
        kronograph.optim.KFAC(kronograph.compile(Pairs(), (torch.randn(2, 8),), loss="cross_entropy"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        kronograph.optim.KFAC(kronograph.compile(Recurrent(16), (torch.randn(2, 4, 8),), loss="cross_entropy"))
        kronograph.optim.KFAC(kronograph.compile(normed_mlp(), (torch.randn(2, 5),), loss="cross_entropy"))
