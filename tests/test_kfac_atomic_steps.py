"""A KFAC step is atomic (issue 11, item 5): a step that raises on its batch, or that skips a batch whose loss or
gradient is not finite, leaves the weights and ``state_dict()`` exactly as before, and the run then continues
exactly as a run that never saw that batch. Targets are checked on every step, not only the first."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kronograph
from kronograph.runtime.inverse import SkippedStepWarning

from equality import same


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def batches(loss: str, steps: int = 4, n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(n, 5, generator=generator)
        y = torch.randint(0, 3, (n,), generator=generator) if loss == "cross_entropy" else torch.randn(n, 3, generator=generator)
        out.append((x, y))
    return out




def run(loss: str, bad: tuple[torch.Tensor, torch.Tensor] | None, expect) -> tuple[list[torch.Tensor], dict]:
    """Two good steps, the bad batch (if any, checked with ``expect``), two good steps."""
    net = model()
    opt = kronograph.optim.KFAC(kronograph.compile(net, (torch.randn(2, 5),), loss=loss), seed=0)
    data = batches(loss)
    for x, y in data[:2]:
        opt.step(x, y)
    if bad is not None:
        state = copy.deepcopy(opt.state_dict())
        weights = [p.detach().clone() for p in net.parameters()]
        expect(opt, *bad)
        assert same(opt.state_dict(), state)
        assert all(torch.equal(p, q) for p, q in zip(weights, net.parameters()))
    for x, y in data[2:]:
        opt.step(x, y)
    return [p.detach().clone() for p in net.parameters()], opt.state_dict()


def raises(match: str):
    def expect(opt, x, y):
        with pytest.raises(kronograph.KronographError, match=match):
            opt.step(x, y)
    return expect


def skips(opt, x, y):
    with pytest.warns(SkippedStepWarning, match="skipped"):
        info = opt.step(x, y)
    assert "skipped" in info


def poisoned_row(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[3, 1] = float("nan")  # one example: it lies in every statistics subset of a batch below the floors
    return x


@pytest.mark.parametrize("loss, bad, expect", [
    ("mse", lambda x, y: (x, y[:, 0]), raises(r"targets of shape \(16,\) do not match model outputs \(16, 3\)")),
    ("cross_entropy", lambda x, y: (x, y + 3), raises(r"labels range over")),
    ("cross_entropy", lambda x, y: (x, y.float()), raises("integer class labels")),
    ("mse", lambda x, y: (x, torch.full_like(y, float("nan"))), skips),
    ("cross_entropy", lambda x, y: (poisoned_row(x), y), skips),
    ("cross_entropy", lambda x, y: (torch.full_like(x, float("inf")), y), skips),
])
def test_a_failed_or_skipped_step_changes_nothing_and_the_run_goes_on_as_without_it(loss, bad, expect):
    x, y = batches(loss, steps=5)[4]
    weights, state = run(loss, bad(x, y), expect)
    clean_weights, clean_state = run(loss, None, None)
    assert all(torch.equal(p, q) for p, q in zip(weights, clean_weights))
    assert same(state, clean_state)
