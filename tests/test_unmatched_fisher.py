"""``unmatched_direction="fisher"`` (the default): the parameters outside every Kronecker block (norms' affines,
learned positions) get a diagonal block in K-FAC's proposal, -g / (F_ii + gamma^2), F_ii an EMA of n g_s^2
from the statistics pass's backward of targets sampled from the model, and the same direction a length of its own in
the quadratic model.

Independent checks: the estimator's mean over many draws against the Fisher's diagonal written out class by class
(sum_c p_c (d log p_c / d theta)^2, per example or per token, float64), on a classifier and on a sequence model
whose loss is a mean over positions; the step against the gradient autograd gives on a copy of the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kronograph
from kronograph.runtime.engines.torch import TorchEngine
from kronograph.runtime.losses import get_loss
from kronograph.runtime.statistics import fisher_diagonal


def normed_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


class TinySequence(nn.Module):
    """Tokens -> a learned position table (no block) -> a layer norm (no block) -> a linear head: logits [n, T, C]."""

    def __init__(self, length: int = 3, width: int = 6, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(2, width)
        self.positions = nn.Parameter(0.5 * torch.randn(length, width))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.embed(x) + self.positions)))


def dense_fisher_diagonal(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The Fisher's diagonal of the mean loss (over examples, and over positions where the logits have them),
    written out: the mean over loss terms of sum_c p_c (d log p_c / d theta)^2, in float64."""
    model = copy.deepcopy(model).double()
    named = dict(model.named_parameters())
    logits = model(x.double())
    logits = logits.reshape(-1, logits.shape[-1])
    log_p = torch.log_softmax(logits, dim=-1)
    total = {name: torch.zeros_like(named[name]) for name in names}
    for term in range(log_p.shape[0]):
        for c in range(log_p.shape[1]):
            grads = torch.autograd.grad(log_p[term, c], [named[name] for name in names], retain_graph=True)
            for name, grad in zip(names, grads):
                total[name] += log_p[term, c].exp().detach() * grad.square()
    return {name: value / log_p.shape[0] for name, value in total.items()}


@pytest.mark.parametrize("factory, shape, names, draws", [
    (normed_mlp, (5,), ["1.weight", "1.bias"], 2000),
    (TinySequence, (3, 2), ["positions", "norm.weight", "norm.bias"], 1000),
], ids=["classifier", "sequence"])
def test_the_statistics_backward_estimates_the_fisher_diagonal(factory, shape, names, draws):
    """``statistics.fisher_diagonal`` (K-FAC's estimate, the mean of n g_s^2) over 1000-2000 sampled passes (n = 6
    examples each) is the Fisher's diagonal to the draws' error (relative standard error sqrt(2 / draws), 3.2-4.5%,
    the tolerance 4-5 times that); the scale 1/sqrt(T) of a loss over positions is part of the check."""
    model = factory()
    cm = kronograph.compile(model, (torch.randn(2, *shape),), loss="cross_entropy")
    engine = TorchEngine(cm, get_loss("cross_entropy"))
    engine.fisher_parameters = names
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(2)
    assert engine.sampled_gradients == []
    for _ in range(draws):
        engine.sampled_pass((x,), 1.0, generator)
    assert len(engine.sampled_gradients) == draws
    each = [fisher_diagonal([({name: g.double() for name, g in grads.items()}, n)])
            for grads, n in engine.sampled_gradients]
    estimate = {name: sum(one[name] for one in each) / draws for name in names}
    exact = dense_fisher_diagonal(model, x, names)
    for name in names:
        assert exact[name].min() > 1e-6, name  # every coordinate has curvature: the relative check means something
        torch.testing.assert_close(estimate[name], exact[name], rtol=0.2 if draws < 2000 else 0.15, atol=0.0, msg=name)


def test_the_gradient_pass_takes_the_same_backward_for_the_parameters():
    """On the gradient's own forward (the statistics' shared pass) the parameters' gradient is autograd's of the
    statistics loss, on a copy of the model, and the sites' g are as without it."""
    model = normed_mlp()
    cm = kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy")
    loss = get_loss("cross_entropy")
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    targets = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(3))
    passes = []
    for names in ([], ["1.weight", "1.bias"]):
        engine = TorchEngine(cm, loss)
        engine.fisher_parameters = names
        result = engine.gradient_pass((x,), y, capture=True, statistics_loss=lambda out: loss(out, targets))
        passes.append((result, engine.sampled_gradients))
    (plain, none), (with_parameters, taken) = passes
    assert none == [] and len(taken) == 1 and taken[0][1] == 7
    probe = copy.deepcopy(model)
    named = dict(probe.named_parameters())
    expected = torch.autograd.grad(loss(probe(x), targets), [named["1.weight"], named["1.bias"]])
    torch.testing.assert_close(taken[0][0]["1.weight"], expected[0])
    torch.testing.assert_close(taken[0][0]["1.bias"], expected[1])
    for name, sites in plain.records.items():
        for a, b in zip(sites, with_parameters.records[name]):
            torch.testing.assert_close(a.g, b.g)


def batches(steps: int, n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(4)
    out = []
    for _ in range(steps):
        x = torch.randn(n, 5, generator=generator)
        out.append((x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()))
    return out


def test_the_unmatched_parameters_step_with_the_blocks_alpha_and_a_length_of_their_own():
    """Momentum and signal scaling off (the update is then alpha times the proposal plus the unmatched coefficient
    times its direction): the layer norm's change is alpha * -g / (F + gamma^2) + unmatched_scale * -g / (F +
    gamma_0^2), g autograd's on a float64 copy, F the optimizer's estimate after the step's fold, gamma the step's
    and gamma_0 the one it started from; the quadratic model has the two directions."""
    model = normed_mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=0, momentum=None,
                                reject_steps=False, signal_scaling=False)
    names = ["1.weight", "1.bias"]
    assert sorted(opt.unmatched) == sorted(names) and sorted(opt.engine.fisher_parameters) == sorted(names)
    directions = []
    gram = opt._fisher_gram
    opt._fisher_gram = lambda inputs, found, cache: directions.append(len(found)) or gram(inputs, found, cache)
    own = 0
    for x, y in batches(8):
        probe = copy.deepcopy(model).double()
        nn.functional.cross_entropy(probe(x.double()), y).backward()
        grads = {name: dict(probe.named_parameters())[name].grad for name in names}
        before = {name: p.detach().double().clone() for name, p in model.named_parameters() if name in names}
        start = opt.gamma
        info = opt.step(x, y)
        after = {name: p.detach().double() for name, p in model.named_parameters() if name in names}
        gamma = info["factor_damping"]
        start = gamma if start is None else start  # (the first step's gamma is set within it)
        for name in names:
            fisher = opt.unmatched_fisher[name].double()
            shares = info["alpha"] / (fisher + gamma**2) + info["unmatched_scale"] / (fisher + start**2)
            expected = -grads[name] * shares
            torch.testing.assert_close(after[name] - before[name], expected, rtol=1e-3, atol=1e-7)
        own += info["unmatched_scale"] > 0
    assert own >= 2 and set(directions) == {2}


@pytest.mark.parametrize("options", [{"unmatched_adam_lr": 1e-3}, {"fisher": "empirical"},
                                     {"unmatched_direction": "rms"}])
def test_without_the_sampled_fisher_the_unmatched_parameters_take_a_direction_of_their_own(options):
    """With Adam's step for them, the empirical Fisher (no sampled backward) or "rms" asked for, no diagonal is
    estimated and the unmatched direction keeps its coefficient in the quadratic model."""
    model = normed_mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=0, **options)
    infos = [opt.step(x, y) for x, y in batches(3)]
    assert opt.engine.fisher_parameters == [] and opt.unmatched_fisher == {}
    assert all("unmatched_scale" in info for info in infos)


def test_the_onnxruntime_engine_estimates_the_diagonal_from_its_sampled_passes():
    """onnxruntime's sampled pass is a training step of the graph on the sampled targets: its gradients of the
    layer norm give the same estimate (tests/test_engine_kfac_parity.py follows the torch engine step by step)."""
    model = normed_mlp()
    cm = kronograph.compile(model, (torch.randn(2, 5),), loss="cross_entropy", engine="onnxruntime")
    opt = kronograph.optim.KFAC(cm, seed=0)
    infos = [opt.step(x.numpy(), y.numpy()) for x, y in batches(3)]
    assert opt.engine.fisher_parameters == ["1.weight", "1.bias"] and sorted(opt.unmatched_fisher) == [
        "1.bias", "1.weight"]
    assert all(bool((value > 0).all()) for value in opt.unmatched_fisher.values())
    assert all("unmatched_scale" in info and "skipped" not in info for info in infos)


def test_a_resumed_run_steps_as_the_uninterrupted_one():
    """The diagonal's EMA is part of the state: six steps, a checkpoint, six more; a fresh optimizer loaded from
    the checkpoint takes the same last six steps."""
    data = batches(12)
    model = normed_mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=0)
    for x, y in data[:6]:
        opt.step(x, y)
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    assert set(state["unmatched_fisher"]) == {"1.weight", "1.bias"}
    for x, y in data[6:]:
        opt.step(x, y)
    resumed_model = normed_mlp()
    resumed_model.load_state_dict(weights)
    resumed = kronograph.optim.KFAC(kronograph.compile(resumed_model, (torch.randn(2, 5),)), seed=7)
    resumed.load_state_dict(state)
    for x, y in data[6:]:
        resumed.step(x, y)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_frozen_parameter_outside_every_block_keeps_its_value_and_its_estimate():
    """The layer norm's weight frozen after two steps: it stays where it is, its diagonal's estimate is no longer
    folded, and the bias, still trained, keeps moving along its own."""
    data = batches(4)
    model = normed_mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 5),)), seed=0)
    for x, y in data[:2]:
        opt.step(x, y)
    model[1].weight.requires_grad_(False)
    weight, estimate = model[1].weight.detach().clone(), opt.unmatched_fisher["1.weight"].clone()
    bias, bias_estimate = model[1].bias.detach().clone(), opt.unmatched_fisher["1.bias"].clone()
    for x, y in data[2:]:
        assert "skipped" not in opt.step(x, y)
    assert torch.equal(model[1].weight.detach(), weight) and torch.equal(opt.unmatched_fisher["1.weight"], estimate)
    assert not torch.equal(model[1].bias.detach(), bias)
    assert not torch.equal(opt.unmatched_fisher["1.bias"], bias_estimate)
