"""``unmatched_adam_lr``: the parameters outside every block take Adam's step on the steps where K-FAC's quadratic
model leaves them where they are (their coefficient 0 or their direction left out).

The reference is Adam's update written out from the gradients autograd gives at each step's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

import kronograph


class Shifted(nn.Module):
    """Two linear layers (blocks) and a learned shift between them that no block covers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.shift = nn.Parameter(torch.zeros(1, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x)) + self.shift)


def batches(steps: int = 12, n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        x = torch.randn(n, 6, generator=generator)
        out.append((x, (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()))
    return out


def test_the_shift_takes_adams_step_where_the_quadratic_model_leaves_it():
    """Without momentum (the update is then the proposal's and the unmatched direction's alone), every step the
    info marks ``unmatched_adam`` moves the shift by -lr m_hat / (sqrt(v_hat) + 1e-8), m and v the EMAs (0.9, 0.999)
    of its gradient at each step's weights (autograd on a copy); on the others by the quadratic model's step."""
    torch.manual_seed(0)
    model = Shifted()
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 6),), loss="cross_entropy"), seed=0,
                                momentum=None, unmatched_adam_lr=0.01, unmatched_backoff=1)
    assert opt.unmatched == ["shift"]
    m = v = torch.zeros(1, 8)
    adam_steps = 0
    for t, (x, y) in enumerate(batches(), start=1):
        twin = copy.deepcopy(model)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(twin(x), y), [twin.shift])
        m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad * grad
        before = model.shift.detach().clone()
        info = opt.step(x, y)
        if info.get("unmatched_adam"):
            adam_steps += 1
            expected = -0.01 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
            torch.testing.assert_close(model.shift.detach() - before, expected, rtol=1e-4, atol=1e-7)
        else:
            assert info["unmatched_scale"] > 0
    assert adam_steps >= 3


def test_it_is_off_by_default_and_in_the_paper_preset_and_resumes_exactly():
    data = batches()
    for options in ({}, {"preset": "paper"}):
        torch.manual_seed(0)
        model = Shifted()
        opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 6),), loss="cross_entropy"), seed=0,
                                    **options)
        assert not any(opt.step(x, y).get("unmatched_adam") for x, y in data[:6])
    torch.manual_seed(0)
    model = Shifted()
    options = dict(seed=0, unmatched_adam_lr=0.01, unmatched_backoff=1)
    opt = kronograph.optim.KFAC(kronograph.compile(model, (torch.randn(2, 6),), loss="cross_entropy"), **options)
    for x, y in data[:5]:
        opt.step(x, y)
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    tail = [opt.step(x, y)["loss"] for x, y in data[5:]]
    other = Shifted()
    other.load_state_dict(weights)
    resumed = kronograph.optim.KFAC(kronograph.compile(other, (torch.randn(2, 6),), loss="cross_entropy"),
                                    **{**options, "seed": 1})
    resumed.load_state_dict(state)
    assert [resumed.step(x, y)["loss"] for x, y in data[5:]] == tail
    assert resumed.unmatched_adam["shift"][2] == len(data)
