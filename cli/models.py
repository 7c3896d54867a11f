"""Resolve the MODEL argument of the CLI: an .onnx path, ``package.module:factory`` or a built-in name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import click
import onnx
import torch

from kronograph.cli.builtins import BUILTINS
from kronograph.errors import KronographError

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}


@dataclass
class ResolvedModel:
    model: torch.nn.Module | Path
    example_inputs: tuple[torch.Tensor, ...]
    default_loss: str


def verbose() -> bool:
    """`kronograph --verbose` was given: compile shows torch's exporter output. Read from click's context, so that
    the commands (and cli/prepare.py for train and bench) need no parameter of their own for it."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("verbose"))


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,32,32' -> (1, 3, 32, 32)."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise KronographError(f"--input-shape {text!r} is not a list of integers; write it like 1,3,32,32") from None
    if not shape or any(d <= 0 for d in shape):
        raise KronographError(f"--input-shape {text!r} needs positive sizes; write it like 1,3,32,32")
    return shape


def is_onnx_model(spec: str) -> bool:
    """MODEL names an ONNX file (existing or not): not a built-in, and an .onnx name or a file."""
    return spec not in BUILTINS and (spec.endswith(".onnx") or Path(spec).is_file())


def onnx_input_rows(path: str | Path) -> tuple[int, ...] | None:
    """The shape of one example of an ONNX file's first data input, when every axis after the batch is
    fixed; None otherwise (or when the file does not load: compiling it names that problem)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    if not inputs or not inputs[0].type.HasField("tensor_type"):
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    rows = tuple(dim.dim_value if dim.HasField("dim_value") else 0 for dim in dims[1:])
    return rows if rows and all(size > 0 for size in rows) else None


def _example(shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    if dtype == "int64":
        return torch.randint(0, 2, shape)
    return torch.randn(shape, dtype=_DTYPES[dtype])


def _factory(spec: str) -> torch.nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise KronographError(f"MODEL {spec!r} is not package.module:factory; write it like mypkg.models:build")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise KronographError(
            f"cannot import {module_name!r} ({type(error).__name__}: {error}); check the name and that it is on PYTHONPATH"
        ) from error
    factory = getattr(module, attribute, None)
    if factory is None or not callable(factory):
        raise KronographError(f"{module_name!r} has no callable {attribute!r}; name a function that returns an nn.Module")
    try:
        model = factory()
    except Exception as error:
        raise KronographError(
            f"{spec} raised {type(error).__name__}: {error}; it must build the model with no arguments"
        ) from error
    if not isinstance(model, torch.nn.Module):
        raise KronographError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def resolve_model(spec: str, input_shapes: tuple[str, ...] = (), input_dtype: str = "float32") -> ResolvedModel:
    """Turn the MODEL argument into a module (with example inputs) or an ONNX path."""
    shapes = tuple(parse_shape(text) for text in input_shapes)
    if spec in BUILTINS:
        builtin = BUILTINS[spec]
        shapes = shapes or (builtin.input_shape,)
        return ResolvedModel(builtin.factory(), tuple(_example(s, input_dtype) for s in shapes), builtin.loss)
    path = Path(spec)
    if spec.endswith(".onnx") or path.is_file():
        if not path.is_file():
            raise KronographError(f"model file not found: {spec}; give an existing .onnx path")
        return ResolvedModel(path, (), "cross_entropy")
    if ":" in spec:
        if not shapes:
            raise KronographError(f"{spec} needs --input-shape (for example --input-shape 1,3,32,32) to trace the model")
        return ResolvedModel(_factory(spec), tuple(_example(s, input_dtype) for s in shapes), "cross_entropy")
    raise KronographError(
        f"unknown MODEL {spec!r}; give an .onnx path, package.module:factory, or a built-in ({', '.join(BUILTINS)})"
    )
