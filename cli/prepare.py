"""What `kronograph train` and `kronograph bench` share before the first step: the engine a MODEL runs on,
the data and the model (seeded), compiling it, and the onnxruntime engine opened and checked on the data.

One place, so that both commands refuse the same inputs with the same words and start from the same
weights. The onnxruntime engine writes its training artifacts to a folder (``ONNXRUNTIME`` inside a run
or bench folder); ``removed_on_failure`` takes back what a command wrote when a later check fails.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import kronograph
from kronograph.cli.builtins import BUILTINS
from kronograph.cli.models import is_onnx_model, onnx_input_rows, resolve_model, verbose
from kronograph.cli.train_data import (BUILTIN_DATA, TrainData, cast_inputs, check_forward_on_data,
                                       check_model_on_data, default_loss, prepare_data)
from kronograph.errors import KronographError

if TYPE_CHECKING:
    from kronograph.runtime.engines.onnxruntime import OnnxRuntimeEngine

#: The onnxruntime engine's training artifacts, inside the run (or bench) folder.
ONNXRUNTIME = "onnxruntime"


def resolve_engine(model: str, engine: str | None) -> str:
    """The engine a run trains on, checked before anything loads: an .onnx file runs on onnxruntime only,
    a module on torch unless --engine onnxruntime."""
    onnx_file = is_onnx_model(model)
    if onnx_file and not Path(model).is_file():
        raise KronographError(f"model file not found: {model}; give an existing .onnx path")
    if onnx_file and engine == "torch":
        raise KronographError(f"{model} is an ONNX file, which trains on the onnxruntime engine only; drop --engine "
                              "torch, or give the PyTorch module as package.module:factory")
    chosen = engine or ("onnxruntime" if onnx_file else "torch")
    if chosen == "onnxruntime":
        try:
            import onnxruntime.training.api  # noqa: F401
        except ImportError:
            raise KronographError("the onnxruntime engine needs onnxruntime-training; install it with `pip install "
                                  "onnxruntime-training`, or train a PyTorch module with --engine torch") from None
    return chosen


def with_data_defaults(model: str, settings: dict[str, Any]) -> dict[str, Any]:
    """A built-in model's own data set and target when none are given."""
    data, target = BUILTIN_DATA.get(model, (None, None))
    if settings["data"] is None:
        if data is None:
            raise KronographError(f"{model} needs --data: an .npz/.npy/.csv file or a data set name (mnist, digits, ...)")
        settings["data"] = data
    if settings["target"] is None:
        settings["target"] = target
    return settings


@dataclass
class Source:
    """What a command trains, before compiling: the data, the model (a module built after seeding torch, or
    the .onnx path) and its loss."""

    name: str  # MODEL as given
    data: TrainData
    model: torch.nn.Module | str
    loss: str
    where: str  # "--data FILE", for messages

    @property
    def onnx_file(self) -> bool:
        return not isinstance(self.model, torch.nn.Module)

    def compile(self, engine: str, module: torch.nn.Module | None = None) -> kronograph.CompiledModel:
        """The model (or ``module``, a copy of it) compiled for ``engine``. On onnxruntime the graph must take
        one input of any batch size, and the data is cast to its dtype."""
        if self.onnx_file:
            compiled = kronograph.compile(self.model, loss=self.loss)
        else:
            compiled = kronograph.compile(self.model if module is None else module, example_inputs=(self.data.x[:2],),
                                          loss=self.loss, engine=engine, verbose=verbose())
        if compiled.engine == "onnxruntime":
            cast_inputs(self.data, graph_input(compiled, self.name, self.onnx_file))
        return compiled

    def open_engine(self, compiled: kronograph.CompiledModel, workdir: Path) -> OnnxRuntimeEngine:
        """``compiled.onnxruntime(workdir)``, checked by a forward pass on two examples: the graph's shapes are
        only known to onnxruntime, so data that does not fit shows here, as one line naming the fix."""
        engine = compiled.onnxruntime(workdir)
        fix = (f"give data whose examples fit its input {input_text(compiled)}, or set --input-shape"
               if self.onnx_file else "give data that fits the model, or train it with --engine torch")
        check_forward_on_data(engine_forward(engine), self.loss, self.data, self.where, fix)
        return engine


def load_source(model: str, settings: Mapping[str, Any],
                init: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Source:
    """The data, then the model: torch is seeded with settings["seed"] before a module is built (its initial
    weights are part of the run) and ``init`` may re-initialise it. The loss is settings["loss"], else the
    built-in's, else the data's; a module is checked by one forward pass on two examples."""
    where, onnx_file = f"--data {settings['data']}", is_onnx_model(model)
    data = prepare_data(model, settings["data"], settings["input"], settings["target"], settings["input_shape"],
                        settings["valid_fraction"], model_rows=onnx_input_rows(model) if onnx_file else None)
    torch.manual_seed(int(settings["seed"]))
    if onnx_file:
        return Source(model, data, model, settings["loss"] or default_loss(data), where)
    module = resolve_model(model, (",".join(map(str, (2, *data.row_shape))),)).model
    module = init(module) if init else module
    loss = settings["loss"] or (BUILTINS[model].loss if model in BUILTINS else default_loss(data))
    check_model_on_data(module, loss, data, where)
    return Source(model, data, module, loss, where)


def engine_forward(engine: OnnxRuntimeEngine,
                   parameters: Mapping[str, Any] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The onnxruntime engine's inference graph as a function of one input batch, at its current weights or
    at ``parameters`` for some of them (an iterate average)."""
    return lambda x: torch.from_numpy(engine.forward([x.numpy()], parameters))


def graph_input(compiled: kronograph.CompiledModel, model: str, onnx_file: bool) -> torch.dtype:
    """Check that the graph has one data input taking batches of any size (training feeds subsets and
    partial batches); return its dtype, the one the data is cast to."""
    inputs = list(compiled.graph.graph.inputs)
    if len(inputs) != 1:
        names = ", ".join(repr(value.name) for value in inputs)
        raise KronographError(f"{model} takes {len(inputs)} inputs ({names}) but the CLI feeds one (--input); "
                              "train it from Python with kronograph.optim.KFAC")
    value = inputs[0]
    shape = value.shape
    if shape is not None and len(shape) and isinstance(shape[0], int):
        fix = (f"export it again with a dynamic batch axis (torch.onnx.export(..., dynamic_axes={{{value.name!r}: "
               "{0: 'batch'}}))" if onnx_file else "train it with --engine torch")
        raise KronographError(f"{model}: the input {value.name!r} has a fixed batch size of {shape[0]} but training "
                              f"feeds batches of other sizes; {fix}")
    try:
        return torch.from_numpy(np.zeros(0, dtype=value.dtype.numpy())).dtype
    except (AttributeError, TypeError):  # no dtype recorded, or one numpy and torch do not share
        return torch.float32


def input_text(compiled: kronograph.CompiledModel) -> str:
    """'x' of shape [N, 6]: the graph's data input as a user reads it (N for a free axis)."""
    value = compiled.graph.graph.inputs[0]
    if value.shape is None:
        return repr(value.name)
    return f"{value.name!r} of shape [{', '.join(str(d) if isinstance(d, int) else 'N' for d in value.shape)}]"


@contextlib.contextmanager
def removed_on_failure(run_dir: Path, resumed: bool) -> Iterator[None]:
    """What a new run wrote before it failed (the folders it created, or the engine's artifacts) is removed."""
    created = next((p for p in reversed((run_dir, *run_dir.parents)) if not p.exists()), None)
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif not resumed:
            shutil.rmtree(run_dir / ONNXRUNTIME, ignore_errors=True)
        raise
