"""KFAC's ``batches_per_step``: the caller's batches gathered into one step's mini-batch (runtime/gathering.py).

Checked against K-FAC stepping on the concatenated batch itself: the gathered step's weights equal it bit for
bit, the calls between leave every weight as it was, a checkpoint taken mid-gathering resumes exactly, a batch
that does not stack ends the gathering early, and the first-order fallback steps on every batch. The automatic
count (None) on labels that are noise against labels that are signal, and its resume.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph
from kronograph.errors import KronographError
from kronograph.runtime.gathering import auto_count
from kronograph.runtime.inverse import SkippedStepWarning, UntrustedModelWarning

from equality import same


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


class PooledSequence(nn.Module):
    """Positions of any length, each through a linear layer, averaged: batches of another length do not stack."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.head = nn.Linear(6, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x)).mean(1))


def batches(count: int, size: int = 16, *shape: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, *(shape or (6,)), generator=generator), torch.randint(4, (size,), generator=generator))
            for _ in range(count)]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_gathered_step_is_the_step_on_the_union():
    """Three batches gathered: the first two calls change nothing and return their batch's loss, the third's weights
    and figures are those of one step on the three concatenated (every later step too)."""
    data = batches(9)
    gathered_model, whole_model = mlp(), mlp()
    gathered = kronograph.optim.KFAC(kronograph.compile(gathered_model, (data[0][0][:2],)), seed=0, batches_per_step=3)
    whole = kronograph.optim.KFAC(kronograph.compile(whole_model, (data[0][0][:2],)), seed=0, batches_per_step=1)
    for start in range(0, 9, 3):
        before = weights(gathered_model)
        for number, (x, y) in enumerate(data[start : start + 3]):
            info = gathered.step(x, y)
            if number < 2:
                assert info["gathered"] == number + 1
                with torch.no_grad():
                    assert info["loss"] == pytest.approx(F.cross_entropy(gathered_model(x), y).item(), rel=1e-6)
                assert_equal(weights(gathered_model), before)
        union = whole.step(torch.cat([x for x, _ in data[start : start + 3]]),
                           torch.cat([y for _, y in data[start : start + 3]]))
        assert info["loss"] == union["loss"] and info["alpha"] == union["alpha"]
        assert_equal(weights(gathered_model), weights(whole_model))
    assert gathered.steps == whole.steps == 3


def test_a_gathering_call_draws_no_random_numbers_for_the_step():
    """With dropout, the gathered step draws the masks one step on the concatenated batches draws (the gathering
    calls' loss forwards put the generator back): the weights equal bit for bit."""
    data = batches(3)
    models = []
    for gather in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.5), nn.Linear(12, 4))
        opt = kronograph.optim.KFAC(kronograph.compile(model, (data[0][0][:2],)), seed=0,
                                    batches_per_step=3 if gather else 1)
        torch.manual_seed(1)
        if gather:
            for x, y in data:
                opt.step(x, y)
        else:
            opt.step(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))
        assert opt.steps == 1
        models.append(model)
    assert_equal(weights(models[0]), weights(models[1]))


def test_a_checkpoint_taken_mid_gathering_resumes_exactly():
    data = batches(7)
    model = mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (data[0][0][:2],)), seed=0, batches_per_step=2)
    for x, y in data[:3]:  # a step, then one batch held
        opt.step(x, y)
    resumed_model = copy.deepcopy(model)
    resumed = kronograph.optim.KFAC(kronograph.compile(resumed_model, (data[0][0][:2],)), seed=0,
                                    batches_per_step=2)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x, y in data[3:]:
        assert opt.step(x, y)["loss"] == resumed.step(x, y)["loss"]
    assert_equal(weights(model), weights(resumed_model))


def test_a_batch_that_does_not_stack_ends_the_gathering():
    """Sequences of 5 positions, then of 7: the call with the 7-long batch steps on the one 5-long batch held (as
    a step on it alone would), and holds the new one."""
    short, long = batches(1, 16, 5, 6)[0], batches(1, 16, 7, 6)[0]
    gathered_model, alone_model = PooledSequence(), PooledSequence()
    gathered = kronograph.optim.KFAC(kronograph.compile(gathered_model, (short[0][:2],)), seed=0, batches_per_step=3)
    alone = kronograph.optim.KFAC(kronograph.compile(alone_model, (short[0][:2],)), seed=0)
    assert "gathered" in gathered.step(*short)
    info = gathered.step(*long)
    assert info["loss"] == alone.step(*short)["loss"]
    assert_equal(weights(gathered_model), weights(alone_model))
    assert len(gathered.gatherer.held) == 1 and gathered.gatherer.held[0][0][0].shape[1] == 7


@pytest.mark.parametrize("held", [0, 1])
@pytest.mark.parametrize("bad, expect", [(lambda x, y: (x, y + 4), "raises"),
                                         (lambda x, y: (torch.full_like(x, float("nan")), y), "skips")])
def test_a_bad_batch_is_refused_at_its_own_call_and_the_held_ones_wait(held, bad, expect):
    """Gathering two batches a step, a batch with labels out of range raises (a NaN batch is skipped, with the
    warning) at its own call, whether it would be held or complete the union: the held batches stay and the run
    goes on as one that never saw it."""
    data = batches(5)
    runs = []
    for with_bad in (True, False):
        model = mlp()
        opt = kronograph.optim.KFAC(kronograph.compile(model, (data[0][0][:2],)), seed=0, batches_per_step=2)
        for x, y in data[:2 + held]:
            opt.step(x, y)
        if with_bad:
            state = copy.deepcopy(opt.state_dict())
            if expect == "raises":
                with pytest.raises(KronographError, match="labels range over"):
                    opt.step(*bad(*data[2]))
            else:
                with pytest.warns(SkippedStepWarning, match="not finite"):
                    assert "skipped" in opt.step(*bad(*data[2]))
            assert same(opt.state_dict(), state)
        for x, y in data[2 + held:]:
            opt.step(x, y)
        runs.append(weights(model))
    assert_equal(*runs)


def test_the_first_order_fallback_steps_on_every_batch():
    """Once the quadratic model is judged untrusted (forced here: any median rho is below 100), Adam's steps
    follow on every call, none gathered."""
    data = batches(12)
    model = mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (data[0][0][:2],)), seed=0, batches_per_step=2,
                                untrusted_rho=100.0, untrusted_steps=2)
    with pytest.warns(UntrustedModelWarning):
        for x, y in data[:8]:
            opt.step(x, y)
    assert opt.fallback_adam is not None
    for x, y in data[8:]:
        before = weights(model)
        info = opt.step(x, y)
        assert info["adam"] and info["loss"] is not None
        assert any(not torch.equal(value, weights(model)[name]) for name, value in before.items())


def test_batches_per_step_must_be_a_positive_count():
    with pytest.raises(KronographError, match="batches_per_step"):
        kronograph.optim.KFAC(kronograph.compile(mlp(), (torch.randn(2, 6),)), batches_per_step=0)



@pytest.mark.parametrize("batches, signal, count", [(1, 1.0, 1), (1, 0.0, 1), (1, 0.5, 1), (1, 0.1, 3),
                                                    (1, 0.01, 10), (4, 0.1, 6), (1, 1e-4, 16)])
def test_the_automatic_count_is_the_noise_scale_over_the_batch_square_rooted(batches, signal, count):
    """With s = S / (S + T / N) on a union of N = batches x n examples, B = T / S = N (1 / s - 1) and the count
    is sqrt(B / n), at most 16: s = 0.1 on one batch is B = 9 n, 3 batches; on four, B = 36 n, 6."""
    assert auto_count(batches, signal) == count


def teacher_batches(count: int, size: int, noise: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Labels of a fixed linear teacher (little noise at this size) or drawn at random (all noise)."""
    generator = torch.Generator().manual_seed(2)
    teacher = torch.randn(6, 4, generator=generator)
    out = []
    for _ in range(count):
        x = torch.randn(size, 6, generator=generator)
        y = torch.randint(4, (size,), generator=generator) if noise else (x @ teacher).argmax(1)
        out.append((x, y))
    return out


def test_automatic_gathering_grows_on_noise_and_not_on_signal():
    """batches_per_step=None: on labels drawn at random (batches of 64) the share of signal falls and steps gather
    several batches; on a teacher's labels in batches of 256, early in training (s 0.7-0.9), one batch a step."""
    counts, steps = {}, {}
    for noise, size in ((True, 64), (False, 256)):
        opt = kronograph.optim.KFAC(kronograph.compile(mlp(), (torch.randn(2, 6),)), seed=0, batches_per_step=None)
        infos = [opt.step(x, y) for x, y in teacher_batches(30 if size > 64 else 60, size, noise)]
        counts[noise] = max(info["batches"] for info in infos if "batches" in info)
        steps[noise] = opt.steps
    assert counts[True] >= 3 and steps[True] < 40
    assert counts[False] == 1 and steps[False] == 30


def test_automatic_gathering_resumes_exactly():
    data = teacher_batches(80, 64, noise=True)
    model = mlp()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (data[0][0][:2],)), seed=0, batches_per_step=None)
    number = 0
    while opt.gatherer.count == 1 or not opt.gatherer.held:  # until a count above one has a batch held
        opt.step(*data[number])
        number += 1
    resumed_model = copy.deepcopy(model)
    resumed = kronograph.optim.KFAC(kronograph.compile(resumed_model, (data[0][0][:2],)), seed=0,
                                    batches_per_step=None)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.gatherer.count == opt.gatherer.count > 1
    for x, y in data[number:]:
        assert opt.step(x, y)["loss"] == resumed.step(x, y)["loss"]
    assert_equal(weights(model), weights(resumed_model))
