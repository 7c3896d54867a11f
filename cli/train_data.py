"""What `kronograph train` feeds the model: training and validation tensors shaped for it, in a seeded order.

Checked up front, before anything is written: the data loads (missing or corrupt files, NaN/Inf: see
datasets.py), each row reshapes to the model's input, one forward pass on two examples runs, and every
target of both splits fits the model's outputs and the loss (labels in range, dtypes, shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kronograph.cli.builtins import BUILTINS
from kronograph.cli.datasets import DATASETS, INPUT, Dataset, load_data, split
from kronograph.cli.models import parse_shape
from kronograph.compiler.outputs import OutputSelector
from kronograph.errors import KronographError
from kronograph.runtime.losses import get_loss
from kronograph.runtime.statistics import preserved_buffers

#: The data each built-in model trains on by default: (data set, target).
BUILTIN_DATA = {"mnist-autoencoder": ("mnist", INPUT), "cnn": ("mnist", None)}


@dataclass
class TrainData:
    x: torch.Tensor
    y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    task: str
    source: str

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def load_splits(data: str, input_key: str, target: str | None, valid_fraction: float) -> tuple[Dataset, Dataset]:
    """(train, valid): a built-in set's own splits, or a file split with ``valid_fraction`` (fixed seed 0,
    so that runs with different --seed values are validated on the same examples)."""
    if data.strip().lower() in DATASETS:
        return (load_data(data, "train", input_key=input_key, target_key=target),
                load_data(data, "valid", input_key=input_key, target_key=target))
    return split(load_data(data, input_key=input_key, target_key=target), valid_fraction, seed=0)


def row_shape_for(model: str, input_shape: str | None, dataset: Dataset,
                  model_rows: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Each example's shape: --input-shape without its batch size, a built-in's input (a conv built-in takes
    the data set's image shape), the ONNX file's own input (``model_rows``), else the data's own."""
    if input_shape:
        return parse_shape(input_shape)[1:] or (1,)
    if model_rows:
        return model_rows
    if model in BUILTINS:
        shape = BUILTINS[model].input_shape[1:]
        return dataset.image_shape if len(shape) > 1 and dataset.image_shape else shape
    return tuple(dataset.x.shape[1:])


def _tensor(dataset: Dataset, rows: tuple[int, ...], data: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = dataset.x
    if math.prod(rows) != math.prod(x.shape[1:]):
        raise KronographError(
            f"--data {data}: each example has {math.prod(x.shape[1:])} values but the model takes inputs of shape "
            f"{'x'.join(map(str, rows))} ({math.prod(rows)} values); give data that fits the model or set --input-shape"
        )
    inputs = torch.from_numpy(np.ascontiguousarray(x)).reshape(len(x), *rows)
    targets = inputs if dataset.task == "autoencoder" else torch.from_numpy(np.ascontiguousarray(dataset.y))
    return inputs, targets


def prepare_data(model: str, data: str, input_key: str, target: str | None, input_shape: str | None,
                 valid_fraction: float, model_rows: tuple[int, ...] | None = None) -> TrainData:
    train, valid = load_splits(data, input_key, target, valid_fraction)
    rows = row_shape_for(model, input_shape, train, model_rows)
    (x, y), (vx, vy) = _tensor(train, rows, data), _tensor(valid, rows, data)
    return TrainData(x, y, vx, vy, train.task, train.source or data)


def default_loss(data: TrainData) -> str:
    """The loss the targets suggest: labels -> cross_entropy, values in [0, 1] -> sigmoid_cross_entropy, else mse."""
    if data.task == "classification":
        return "cross_entropy"
    if data.y.dtype.is_floating_point and float(data.y.min()) >= 0 and float(data.y.max()) <= 1:
        return "sigmoid_cross_entropy"
    return "mse"


def cast_inputs(data: TrainData, dtype: torch.dtype) -> None:
    """Floating-point inputs in the model's dtype (the autoencoder's targets with them)."""
    if data.x.dtype != dtype and data.x.dtype.is_floating_point and dtype.is_floating_point:
        data.x, data.valid_x = data.x.to(dtype), data.valid_x.to(dtype)
        if data.task == "autoencoder":
            data.y, data.valid_y = data.x, data.valid_x


def check_model_on_data(module: torch.nn.Module, loss_name: str, data: TrainData, where: str) -> None:
    """One forward pass on two examples, then every target against the outputs' shape and the loss's rules;
    errors become one line naming the problem and the fix. Casts the inputs to the model's dtype."""
    dtype = next((p.dtype for p in module.parameters() if p.dtype.is_floating_point), torch.float32)
    if data.x.dtype != dtype:
        data.x, data.valid_x = data.x.to(dtype), data.valid_x.to(dtype)
        if data.task == "autoencoder":
            data.y, data.valid_y = data.x, data.valid_x

    def forward(sample: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), preserved_buffers(module):
            return module(sample)

    check_forward_on_data(forward, loss_name, data, where)


def check_forward_on_data(forward: Callable[[torch.Tensor], torch.Tensor], loss_name: str, data: TrainData,
                          where: str, fix: str = "give data that fits the model, or set --input-shape") -> None:
    """``forward`` (a module's or an engine's) on two examples, then every target against the outputs."""
    sample = data.x[:2]
    try:
        outputs = forward(sample)
    except Exception as error:  # whatever the model raises, it means "these inputs do not fit"
        if isinstance(error, KronographError) and error.__cause__ is not None:
            error = error.__cause__  # onnxruntime's own words, not the engine's summary of them
        text = " ".join(str(error).split())
        text = text.split(" : ")[-1] if text.startswith("[ONNXRuntimeError]") else text  # drop the status codes
        raise KronographError(
            f"the model cannot run on {where}: a forward pass on inputs of shape {list(sample.shape)} raised "
            f"{type(error).__name__}: {text[:300].rstrip('.')}; {fix}"
        ) from None
    outputs = OutputSelector(None, outputs).select(outputs)  # compile's default: "logits" of a dict, element 0
    loss = get_loss(loss_name)
    for targets in (data.y, data.valid_y):
        try:
            loss.check_targets(outputs[:1].expand(len(targets), *outputs.shape[1:]), targets)
        except KronographError as error:
            raise KronographError(f"{where}: {error} (model outputs {list(outputs.shape[1:])} per example)") from None


class DataOrder:
    """Batch k (from 0) of a run depends on (seed, k) alone: epoch e = k // batches_per_epoch visits the
    permutation drawn from numpy's generator seeded with [seed, e]; the last partial batch of an epoch is
    left out (every step sees the same batch size). A resumed run needs nothing but the step count."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.per_epoch = n // self.batch_size
        self._epoch, self._perm = -1, np.arange(0)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of batch ``step``."""
        return divmod(step, self.per_epoch)

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the examples in ``epoch`` (the last one drawn is cached)."""
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        epoch, index = self.position(step)
        return torch.from_numpy(self.permutation(epoch)[index * self.batch_size:(index + 1) * self.batch_size])

    def size(self, step: int) -> int:  # noqa: ARG002 - every batch has the same size
        return self.batch_size

    def epoch_start(self, epoch: int) -> int:
        """The first step of ``epoch``: the length of a run of that many epochs (--epochs)."""
        return epoch * self.per_epoch


def batch_schedule(kind: str, batch_size: int, n: int, start: int = 1000, growth: float | None = None
                   ) -> Callable[[int], int]:
    """Batch size of step ``k`` (from 0): "fixed" -> ``batch_size``; "exp" -> the paper's (sec 13)
    m_k = min(m_1 exp((k-1)/b), |S|) for iteration k + 1, with m_1 = ``start``, b = ``growth`` and |S| = ``n``;
    ``growth=None`` picks b so that m_500 = |S|, as the paper does. Sizes never exceed ``n``."""
    if kind == "fixed":
        return lambda step: min(batch_size, n)
    if kind != "exp":
        raise KronographError(f"unknown batch schedule {kind!r}; choose fixed or exp")
    first = min(start, n)
    rate = growth if growth is not None else (499 / math.log(n / first) if n > first else 1.0)
    return lambda step: min(n, int(round(first * math.exp(min(step / rate, 700.0)))))


class ScheduledOrder(DataOrder):
    """Batches whose size follows a schedule (``batch_schedule``), drawn in order from the same seeded epoch
    permutations as DataOrder: a batch that does not fit in what is left of an epoch starts the next one, so a
    batch never repeats an example and a batch of |S| is the whole set. With a fixed size the batches are
    DataOrder's. Batch k depends on (seed, schedule, k) alone; the walk to it is cached for the next call."""

    def __init__(self, n: int, sizes: Callable[[int], int], seed: int) -> None:
        super().__init__(n, max(1, sizes(0)), seed)
        self.sizes = sizes
        # batch self._step is batch self._batch of epoch self._at and starts at self._offset of it
        self._step, self._at, self._batch, self._offset = 0, 0, 0, 0

    def size(self, step: int) -> int:
        return max(1, min(self.sizes(step), self.n))

    def _walk(self, step: int) -> int:
        """Move the cached walk to batch ``step`` (from the start when it lies behind); return its size."""
        if step < self._step:
            self._step, self._at, self._batch, self._offset = 0, 0, 0, 0
        while True:
            size = self.size(self._step)
            if self._offset + size > self.n:
                self._at, self._batch, self._offset = self._at + 1, 0, 0
            if self._step == step:
                return size
            self._step, self._batch, self._offset = self._step + 1, self._batch + 1, self._offset + size

    def indices(self, step: int) -> torch.Tensor:
        size = self._walk(step)
        return torch.from_numpy(self.permutation(self._at)[self._offset:self._offset + size])

    def position(self, step: int) -> tuple[int, int]:
        self._walk(step)
        return self._at, self._batch

    def epoch_start(self, epoch: int) -> int:
        step = 0
        while self.position(step)[0] < epoch:
            step += 1
        return step


def evaluate_many(model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
                  figures: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                  x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  select: Callable[[Any], torch.Tensor] | None = None) -> dict[str, float]:
    """Means over (x, y) of per-example ``figures(outputs, targets)``, without gradients, in batches: of a
    module in eval mode, or of any forward function (the onnxruntime engine's); draws no random numbers.
    ``select`` reduces what a module returns (a dict, a tuple, a ModelOutput) to the tensor the loss is put
    on: the compiled model's ``select_output``."""
    if not isinstance(model, torch.nn.Module):
        return evaluate_forward(model, figures, x, y, batch_size, select)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return evaluate_forward(model, figures, x, y, batch_size, select)
    finally:
        model.train(was_training)


def evaluate_forward(forward: Callable[[torch.Tensor], torch.Tensor],
                     figures: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                     x: torch.Tensor, y: torch.Tensor, batch_size: int,
                     select: Callable[[Any], torch.Tensor] | None = None) -> dict[str, float]:
    """Means over (x, y) of per-example ``figures`` of ``forward``'s outputs (a module in eval mode, or the
    onnxruntime engine's inference graph), in batches."""
    totals = dict.fromkeys(figures, 0.0)
    for start in range(0, len(x), batch_size):
        outputs, targets = forward(x[start:start + batch_size]), y[start:start + batch_size]
        if select is not None:
            outputs = select(outputs)
        for name, figure in figures.items():
            totals[name] += float(figure(outputs, targets).sum())
    return {name: total / max(1, len(x)) for name, total in totals.items()}


def evaluate(model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor], loss_name: str, x: torch.Tensor,
             y: torch.Tensor, batch_size: int, select: Callable[[Any], torch.Tensor] | None = None) -> float:
    """Mean loss on (x, y) (``evaluate_many``)."""
    return evaluate_many(model, {"loss": get_loss(loss_name).per_example}, x, y, batch_size, select)["loss"]
