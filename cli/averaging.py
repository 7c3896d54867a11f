"""The paper's (sec 13) iterate averaging, shared by `kronograph train` and `kronograph bench`: after every
step avg <- xi avg + (1 - xi) theta, starting from the parameters it is made with. One class per engine:
the torch module's parameters (IterateAverage) and the onnxruntime engine's weights (EngineAverage). Both
give the average for evaluation (``module()``), as a checkpointable state (``state_dict``, by the names
the weights have in ``CompiledModel.state_dict``), and can copy it into the trained weights (``apply``),
which a run does at its end so that the model it writes is the averaged one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from kronograph.cli.prepare import engine_forward
from kronograph.errors import KronographError

if TYPE_CHECKING:
    from kronograph.runtime.engines.onnxruntime import OnnxRuntimeEngine


def _load(average: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy a checkpoint's average into ``average`` in place; a missing or extra name is an error."""
    if set(state) != set(average):
        raise KronographError("the checkpoint's iterate average does not fit the model; resume with the MODEL that "
                              "wrote it")
    with torch.no_grad():
        for name, tensor in average.items():
            tensor.copy_(state[name])


class IterateAverage:
    """The average of a torch module's parameters. ``module()`` is a copy holding the average (and the live
    module's buffers), for evaluation."""

    def __init__(self, module: torch.nn.Module, xi: float) -> None:
        self.xi = xi
        self._live = module
        self._copy = copy.deepcopy(module)
        self._pairs = list(zip(self._copy.parameters(), module.parameters()))

    @torch.no_grad()
    def update(self) -> None:
        for average, current in self._pairs:
            average.mul_(self.xi).add_(current.detach(), alpha=1 - self.xi)

    @torch.no_grad()
    def module(self) -> torch.nn.Module:
        for mine, theirs in zip(self._copy.buffers(), self._live.buffers()):
            mine.copy_(theirs)
        return self._copy

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self._copy.named_parameters()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load(dict(self._copy.named_parameters()), state)

    @torch.no_grad()
    def apply(self) -> None:
        """The live module's parameters become the average (the run is over: the optimizer is done)."""
        for average, current in self._pairs:
            current.copy_(average)


class EngineAverage:
    """The average of the onnxruntime engine's weights (``engine.parameters()``, copies); ``module()`` is the
    engine's inference graph at the average, for evaluation: the engine's own weights are left alone."""

    def __init__(self, engine: OnnxRuntimeEngine, xi: float) -> None:
        self.xi = xi
        self._engine = engine
        self._average = {name: torch.from_numpy(value) for name, value in engine.parameters().items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, current in self._engine.parameters().items():
            self._average[name].mul_(self.xi).add_(torch.from_numpy(current), alpha=1 - self.xi)

    def module(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return engine_forward(self._engine, self._average)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self._average.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load(self._average, state)

    def apply(self) -> None:
        """The engine's weights become the average (the run is over: the optimizer is done)."""
        self._engine.set_parameters(self._average)


def iterate_average(model: torch.nn.Module | OnnxRuntimeEngine, xi: float) -> IterateAverage | EngineAverage | None:
    """The average of what a run trains (its module, or its onnxruntime engine); None when xi is 0 (off)."""
    if not xi:
        return None
    return IterateAverage(model, xi) if isinstance(model, torch.nn.Module) else EngineAverage(model, xi)
