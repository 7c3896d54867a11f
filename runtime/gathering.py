"""The caller's batches gathered into one step's mini-batch (K-FAC's ``batches_per_step``).

K-FAC's step costs its own algebra (statistics on a sub-batch, the quadratic model's products on another,
inverses, preconditioning) on top of the gradient, and on a small batch most of what the step buys is the
batch's noise; Martens & Grosse (sec 13) take mini-batches of 1000 examples and more. Gathering N of a caller's
batches and stepping once on their union gives the step that mini-batch without the caller changing theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # (inputs, targets), examples along dim 0 of each


def _stackable(a: Batch, b: Batch) -> bool:
    """Whether two batches concatenate along dim 0: the same number of inputs, their shapes equal past dim 0,
    dtypes and devices equal."""
    tensors_a, tensors_b = (*a[0], a[1]), (*b[0], b[1])
    return len(tensors_a) == len(tensors_b) and all(
        s.shape[1:] == t.shape[1:] and s.dtype == t.dtype and s.device == t.device
        for s, t in zip(tensors_a, tensors_b))


def _union(batches: list[Batch]) -> Batch:
    if len(batches) == 1:
        return batches[0]
    inputs = tuple(torch.cat([batch[0][i] for batch in batches]) for i in range(len(batches[0][0])))
    return inputs, torch.cat([batch[1] for batch in batches])


class BatchGatherer:
    """Gathers ``count`` batches and hands back their union, one step's mini-batch.

    ``add`` keeps a batch and returns None while fewer than ``count`` are held, else the union of the held
    ones (then holds none). A batch that does not stack with the held ones (another sequence length, say)
    ends the gathering early: the held ones' union is returned and the new batch starts the next."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.held: list[Batch] = []

    def add(self, inputs: tuple[torch.Tensor, ...], y: torch.Tensor) -> Batch | None:
        batch = (inputs, y)
        if self.held and not _stackable(self.held[-1], batch):
            earlier, self.held = self.held, [batch]
            return _union(earlier)
        self.held.append(batch)
        if len(self.held) < self.count:
            return None
        earlier, self.held = self.held, []
        return _union(earlier)

    def flush(self) -> Batch | None:
        """The held batches' union (None if none), holding none after."""
        earlier, self.held = self.held, []
        return _union(earlier) if earlier else None

    def state_dict(self) -> list[dict[str, Any]]:
        """The held batches (a resumed run steps on the same union)."""
        return [{"inputs": [t.clone() for t in inputs], "y": y.clone()} for inputs, y in self.held]

    def load_state_dict(self, state: list[Mapping[str, Any]], device: torch.device) -> None:
        self.held = [(tuple(t.to(device) for t in batch["inputs"]), batch["y"].to(device)) for batch in state]
