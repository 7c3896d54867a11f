"""Which initializers of a graph are the trainable parameters, under the source model's names."""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx_ir as ir
import torch

from kronograph.errors import KronographError

_FLOATS = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def module_parameters(
    module: torch.nn.Module, model: ir.Model
) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Map the graph's initializers to the module's trainable parameters.

    A tied parameter has several names (``embed.weight`` and ``head.weight``); the exporter keeps one of
    them and the plan uses the module's first name (the one ``named_parameters()`` gives).
    Returns:
        (initializer name -> parameter name, in module order; parameters absent from the graph -> shape)
    """
    initializers = model.graph.initializers
    found: dict[str, str] = {}
    missing: dict[str, tuple[int, ...]] = {}
    aliases: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        in_graph = [alias for alias in aliases[id(param)] if alias in initializers]
        if not in_graph:
            missing[name] = tuple(param.shape)
            continue
        value = initializers[in_graph[0]]
        if tuple(value.shape) != tuple(param.shape):
            raise KronographError(
                f"the exported graph holds {in_graph[0]} with shape {tuple(value.shape)} but the module's "
                f"parameter has {tuple(param.shape)}; this exporter version renames parameters, report it"
            )
        found[in_graph[0]] = name
    return found, missing


def _batch_norm_statistics(graph: ir.Graph) -> set[str]:
    names = set()
    for node in graph:
        if node.op_type == "BatchNormalization":
            names.update(v.name for v in node.inputs[3:5] if v is not None)
    return names


def onnx_parameters(model: ir.Model, trainable: Sequence[str] | None = None) -> dict[str, str]:
    """Trainable initializers of an ONNX file (names are kept as they are).

    By default: every floating-point initializer with more than one element, except batch-norm running
    statistics (single numbers are almost always constants such as 1/sqrt(d)).
    """
    initializers = model.graph.initializers
    if trainable is not None:
        unknown = [name for name in trainable if name not in initializers]
        if unknown:
            raise KronographError(
                f"trainable names {unknown[:3]} are not initializers of the graph; run `kronograph inspect` to list them"
            )
        return {name: name for name in trainable}
    statistics = _batch_norm_statistics(model.graph)
    return {
        name: name
        for name, value in initializers.items()
        if value.dtype in _FLOATS
        and name not in statistics
        and value.shape is not None
        and math.prod(value.shape.numpy()) > 1
    }
