"""The caller's batches gathered into one step's mini-batch (K-FAC's ``batches_per_step``).

K-FAC's step costs its own algebra (statistics on a sub-batch, the quadratic model's products on another,
inverses, preconditioning) on top of the gradient, and on a small batch most of what the step buys is the
batch's noise; Martens & Grosse (sec 13) take mini-batches of 1000 examples and more. Gathering N of a caller's
batches and stepping once on their union gives the step that mini-batch without the caller changing theirs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

Batch = tuple[tuple[torch.Tensor, ...], torch.Tensor]  # (inputs, targets), examples along dim 0 of each

#: The most batches ``auto_count`` gathers into one step: the union's activations are held at once.
MAX_AUTO_COUNT = 16


def auto_count(batches: int, signal: float) -> int:
    """How many of the caller's batches a step should gather, from the share of signal s in the natural gradient of
    the last step's union of ``batches`` batches (K-FAC's ``signal_scaling`` measures it on the union's halves).

    With N examples a step, s = S / (S + T / N), S the true gradient's and T the noise's part of g^T F^-1 g, so
    B = N (1 / s - 1) = T / S is the gradient's noise scale in K-FAC's metric (McCandlish et al. 2018). The steps to
    a loss go as 1 + B / N and a step costs a fixed part c_0 (K-FAC's own algebra, sub-batched) plus c_1 N (the
    passes over the batch): time is least at N = sqrt(B c_0 / c_1). Taking c_0 as the cost of passes over one of
    the caller's batches of n examples (c_0 = c_1 n), the union should hold sqrt(B / n) batches, B / n =
    ``batches`` (1 / s - 1). s = 0 (no signal measured yet, or a batch of one): one batch."""
    if not signal > 0:
        return 1
    return max(1, min(MAX_AUTO_COUNT, round(math.sqrt(batches * (1 / min(signal, 1.0) - 1)))))


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
        self.united = 1  # how many batches the last union held

    def add(self, inputs: tuple[torch.Tensor, ...], y: torch.Tensor) -> Batch | None:
        batch = (inputs, y)
        if self.held and not _stackable(self.held[-1], batch):
            earlier, self.held = self.held, [batch]
            return self._union(earlier)
        self.held.append(batch)
        if len(self.held) < self.count:
            return None
        earlier, self.held = self.held, []
        return self._union(earlier)

    def _union(self, batches: list[Batch]) -> Batch:
        self.united = len(batches)
        return _union(batches)

    def state_dict(self) -> list[dict[str, Any]]:
        """The held batches (a resumed run steps on the same union)."""
        return [{"inputs": [t.clone() for t in inputs], "y": y.clone()} for inputs, y in self.held]

    def load_state_dict(self, state: list[Mapping[str, Any]]) -> None:
        """The held batches of ``state_dict``, their tensors already where the model is (``statistics.on_device``)."""
        self.held = [(tuple(batch["inputs"]), batch["y"]) for batch in state]
