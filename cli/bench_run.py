"""The runs of `kronograph bench`: each optimizer from the same initial weights on the same batches, with a
time or step budget, and the loss evaluated at about 20 points on a fixed subset of the training data.

Only the optimizer is timed: fetching the batch, ``step`` and the iterate average's update. Evaluation,
compiling and building the optimizer are not charged. Every run starts from ``copy.deepcopy`` of one
module built once (seeded), with torch's generator reseeded, so the runs differ only in the optimizer. On
the onnxruntime engine every run compiles the model again into an engine of its own (artifacts in
``Problem.workdir/<optimizer>``), set to the initial weights read once; its evaluations (the iterate
average's too) run the engine's inference graph.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from kronograph.cli.averaging import EngineAverage, IterateAverage, iterate_average
from kronograph.cli.builtins import sparse_init_
from kronograph.cli.optimizers import Optimizer, make_optimizer
from kronograph.cli.prepare import Source, engine_forward
from kronograph.cli.train_data import ScheduledOrder, TrainData, batch_schedule, evaluate_many
from kronograph.runtime.losses import get_loss

if TYPE_CHECKING:
    from kronograph.runtime.engines.onnxruntime import OnnxRuntimeEngine

    #: What a run trains: the module (torch engine), or the engine holding the weights (onnxruntime).
    Trained = torch.nn.Module | OnnxRuntimeEngine

PROBES = 20  # evaluations per run, besides the one before the first step
EVAL_BATCH = 4096  # examples per forward pass of an evaluation
INITS = ("sparse", "default")


@dataclass(frozen=True)
class Budget:
    """A run's length: optimizer seconds or steps (exactly one is set)."""

    seconds: float | None = None
    steps: int | None = None

    @property
    def total(self) -> float:
        return self.seconds if self.seconds is not None else float(self.steps or 1)

    def spent(self, steps: int, seconds: float) -> float:
        """What counts against the budget (seconds or steps), capped at the total."""
        return min(seconds if self.seconds is not None else steps, self.total)

    def progress(self, steps: int, seconds: float) -> float:
        """How much of the budget is spent: 0 at the start, 1 when the run is over."""
        return self.spent(steps, seconds) / self.total

    def describe(self) -> str:
        return f"{self.seconds:g} s of optimizer time" if self.seconds is not None else f"{self.steps} steps"


@dataclass(frozen=True)
class Contender:
    """One optimizer's set-up: its resolved options, its batch-size schedule and iterate averaging (xi; 0: off)."""

    name: str
    options: dict[str, Any]
    batch_size: int = 512
    batch_schedule: str = "fixed"
    batch_start: int = 1000
    batch_growth: float | None = None
    average: float = 0.0

    def sizes(self, n: int) -> Callable[[int], int]:
        return batch_schedule(self.batch_schedule, self.batch_size, n, self.batch_start, self.batch_growth)


def reconstruction_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The autoencoder papers' figure, per example: squared error of sigmoid(outputs) against the input,
    summed over pixels."""
    return (torch.sigmoid(outputs) - targets.to(outputs.dtype)).pow(2).reshape(len(outputs), -1).sum(dim=1)


def initialise(module: torch.nn.Module, init: str | None) -> torch.nn.Module:
    """``sparse``: Martens (2010) on every Linear layer; ``default``: PyTorch's own ``reset_parameters``;
    None: as the model built itself (the built-in autoencoder is sparse)."""
    if init == "sparse":
        sparse_init_(module)
    elif init == "default":
        for layer in module.modules():
            if layer is not module and callable(getattr(layer, "reset_parameters", None)):
                layer.reset_parameters()
    return module


@dataclass
class Problem:
    """The shared part of every run: the data, the initial model (never trained) and the loss (``source``),
    the engine, the seed. On onnxruntime, ``initial`` holds the initial weights by ONNX name and each run's
    engine writes its artifacts in ``workdir/<its name>``."""

    source: Source
    engine: str
    seed: int
    eval_examples: int
    name: str  # the data set's name or file, as given
    workdir: Path | None = None
    initial: dict[str, torch.Tensor] | None = None
    figures: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(init=False)
    #: the compiled model's output selection (a module returning a dict or a tuple); set by ``fresh``
    select: Callable[[Any], torch.Tensor] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.figures = {"loss": get_loss(self.loss).per_example}
        if self.loss == "sigmoid_cross_entropy":
            self.figures["reconstruction"] = reconstruction_error

    @property
    def data(self) -> TrainData:
        return self.source.data

    @property
    def loss(self) -> str:
        return self.source.loss

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.data.x[index]
        return x, (x if self.data.task == "autoencoder" else self.data.y[index])

    def fresh(self, contender: Contender, folder: str | None = None) -> tuple[Trained, Optimizer]:
        """A copy of the initial model, compiled, with the contender's optimizer; torch reseeded. On
        onnxruntime: an engine of its own in ``workdir/folder`` (default: the contender's name), set to the
        initial weights."""
        torch.manual_seed(self.seed)
        module = None if self.source.onnx_file else copy.deepcopy(self.source.model)
        compiled = self.source.compile(self.engine, module)
        if compiled.engine == "torch":
            self.select = compiled.select_output
            return module, make_optimizer(contender.name, compiled, contender.options, seed=self.seed)
        engine = self.source.open_engine(compiled, self.workdir / (folder or contender.name))
        engine.set_parameters({name: self.initial[name] for name in engine.trainable})  # before the optimizer
        return engine, make_optimizer(contender.name, compiled, contender.options, seed=self.seed)

    def evaluate(self, model: Trained, average: IterateAverage | EngineAverage | None) -> dict[str, float]:
        """The figures on the first ``eval_examples`` training examples; with averaging, those of the current
        and of the averaged parameters and, as the paper reports, the smaller of the two."""
        x, y = self.data.x[:self.eval_examples], self.data.y[:self.eval_examples]
        live = model if isinstance(model, torch.nn.Module) else engine_forward(model)
        select = self.select if isinstance(model, torch.nn.Module) else None
        current = evaluate_many(live, self.figures, x, y, EVAL_BATCH, select)
        if average is None:
            return current
        averaged = evaluate_many(average.module(), self.figures, x, y, EVAL_BATCH, select)
        point = {key: _smaller(current[key], averaged[key]) for key in current}
        for key in current:
            point[f"{key}_current"], point[f"{key}_averaged"] = current[key], averaged[key]
        return point


def _smaller(a: float, b: float) -> float:
    return b if math.isnan(a) or b < a else a


def run(problem: Problem, contender: Contender, budget: Budget,
        built: tuple[Trained, Optimizer] | None = None) -> dict[str, Any]:
    """Train a fresh copy (``built``: from ``problem.fresh(contender)``) until the budget is spent. Returns
    {"steps", "seconds", "examples", "curve"}: the curve holds the evaluations (step, time, examples,
    batch_size, batch_loss, and the figures), the first before any step, the last at the end."""
    model, optimizer = built or problem.fresh(contender)
    torch.manual_seed(problem.seed)
    order = ScheduledOrder(len(problem.data.x), contender.sizes(len(problem.data.x)), problem.seed)
    average = iterate_average(model, contender.average)
    steps, seconds, examples, size, info, probed = 0, 0.0, 0, order.size(0), {"loss": math.nan}, 0
    curve = [{"step": 0, "time": 0.0, "examples": 0, "batch_size": size, "batch_loss": None,
              **problem.evaluate(model, average)}]
    bar = _bar(contender.name, budget)
    try:
        while budget.progress(steps, seconds) < 1:
            tick = time.perf_counter()
            size = order.size(steps)
            info = optimizer.step(*problem.batch(order.indices(steps)))
            if average is not None:
                average.update()
            seconds += time.perf_counter() - tick
            steps, examples = steps + 1, examples + size
            bar.update(budget.spent(steps, seconds) - bar.n)
            bar.set_postfix({"step": steps, "batch loss": f"{info['loss']:.4g}", "eval": f"{curve[-1]['loss']:.4g}"},
                            refresh=False)
            if math.floor(budget.progress(steps, seconds) * PROBES) > probed:
                probed = math.floor(budget.progress(steps, seconds) * PROBES)
                curve.append({"step": steps, "time": seconds, "examples": examples, "batch_size": size,
                              "batch_loss": info["loss"], **problem.evaluate(model, average)})
    finally:
        bar.close()
    return {"steps": steps, "seconds": seconds, "examples": examples, "curve": curve}


def _bar(name: str, budget: Budget) -> tqdm:
    if budget.seconds is not None:
        return tqdm(total=budget.seconds, desc=name, file=sys.stderr, disable=None, dynamic_ncols=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}{postfix}]")
    return tqdm(total=budget.steps, desc=name, unit="step", file=sys.stderr, disable=None, dynamic_ncols=True)


def sgd_step_seconds(problem: Problem, sgd: Contender, warmup: int = 2, steps: int = 20, limit: float = 3.0) -> float:
    """Seconds of one SGD step (batch fetch included) on a copy of the initial model at ``sgd.batch_size``:
    the mean of up to ``steps`` timed steps (at most ``limit`` seconds) after ``warmup`` untimed ones."""
    _, optimizer = problem.fresh(sgd, folder=f"{sgd.name}-timing")
    order = ScheduledOrder(len(problem.data.x), lambda step: sgd.batch_size, problem.seed)
    timed, spent = 0, 0.0
    for step in range(warmup + steps):
        tick = time.perf_counter()
        optimizer.step(*problem.batch(order.indices(step)))
        if step >= warmup:
            timed, spent = timed + 1, spent + time.perf_counter() - tick
            if spent >= limit:
                break
    return spent / max(1, timed)
