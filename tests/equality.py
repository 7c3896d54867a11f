"""Exact equality of optimizer states, for the tests that a failed step changes nothing, and a resumed K-FAC run."""

from __future__ import annotations

import copy

import torch

import kronograph


def same(a, b) -> bool:
    """Exact equality (tensors bit for bit, the generator's state included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def kfac_resumed(make_model, batches, example: torch.Tensor, split: int = 5):
    """KFAC from ``make_model()`` (seed 0) over ``batches``, its state taken after ``split`` of them and loaded into a
    fresh model (other weights, then the saved ones) and optimizer (another seed): (the resumed optimizer, the
    uninterrupted run's losses after ``split``, the resumed run's), which must be equal."""
    import copy

    import kronograph

    def optimizer(model, seed):
        return kronograph.optim.KFAC(kronograph.compile(model, (example,), loss="cross_entropy"), seed=seed)

    torch.manual_seed(0)
    model = make_model()
    opt = optimizer(model, 0)
    for x, y in batches[:split]:
        opt.step(x, y)
    state = copy.deepcopy(opt.state_dict())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    tail = [opt.step(x, y)["loss"] for x, y in batches[split:]]
    torch.manual_seed(3)
    other = make_model()
    other.load_state_dict(weights)
    resumed = optimizer(other, 1)
    resumed.load_state_dict(state)
    return resumed, tail, [resumed.step(x, y)["loss"] for x, y in batches[split:]]
