"""Spectrally normed layers: a linear or convolution layer whose weight is computed as W = W_o / sigma (PyTorch's
``spectral_norm``, old or parametrization), the graph's Div(W_o, sigma) with sigma a scalar computed from W_o (the
power iteration's u^T W_o v; in training mode the iteration itself is in the graph too).

Coverage turns W_o down (a Div is no layer's site), yet the layer is an ordinary Kronecker layer of its computed
weight W: the same a and g, the same Fisher block in W's coordinates. The runtime (runtime/spectral_norm.py) reads
sigma * grad W_o as the gradient in W's coordinates and pulls a step Delta W back as dW_o = sigma Delta W. Here the
computed weight is matched as if it were a parameter, named as the module's attribute (``fc.weight``); the layer
keeps W_o as ``Layer.spectral_norm``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx_ir as ir

from kronograph.passes.graph import static_shape

_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.original$")


@dataclass(frozen=True)
class SpectralWeight:
    """A weight computed by spectral norm in the graph: the Div's output ``value``, W_o and the nodes that compute W."""

    value: ir.Value
    original: str  # W_o
    name: str  # the computed weight's name: the module attribute (``fc.weight``)
    nodes: frozenset[str]  # the Div and every node sigma is computed by: the only readers of W_o allowed


def computed_name(original: str) -> str | None:
    """The module attribute a spectral norm's W_o computes: ``fc.parametrizations.weight.original``
    (torch.nn.utils.parametrizations.spectral_norm) and ``fc.weight_orig`` (the older torch.nn.utils.spectral_norm)
    both give ``fc.weight``; None for a name neither gives (a model's own W / c(W): the runtime reads sigma from
    PyTorch's power-iteration vectors, which it would not have)."""
    found = _PARAMETRIZED.match(original)
    if found:
        owner, attribute = found.groups()
        return f"{owner}.{attribute}" if owner else attribute
    return original[: -len("_orig")] if original.endswith("_orig") else None


def _ancestors(value: ir.Value) -> tuple[set[str], set[str]]:
    """The names of the nodes ``value`` is computed by, and of the values they read."""
    nodes: set[str] = set()
    read: set[str] = set()
    stack = [value.producer()]
    while stack:
        node = stack.pop()
        if node is None or node.name in nodes:
            continue
        nodes.add(node.name)
        for source in node.inputs:
            if source is not None:
                read.add(source.name)
                stack.append(source.producer())
    return nodes, read


def find_spectral_norms(graph: ir.Graph, parameters: dict[str, str], shapes: dict[str, tuple[int, ...]]
                        ) -> list[SpectralWeight]:
    """Every Div(W_o, sigma) of a parameter W_o (two axes or more, named as PyTorch's spectral norm names it) by a
    scalar sigma computed from W_o."""
    found = []
    for node in graph:
        if node.op_type != "Div" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        weight, sigma = node.inputs
        if weight is None or sigma is None or weight.name not in parameters or weight.producer() is not None:
            continue
        original = parameters[weight.name]
        shape = static_shape(sigma)
        if len(shapes[original]) < 2 or shape is None or any(d != 1 for d in shape):
            continue
        nodes, read = _ancestors(sigma)
        name = computed_name(original)
        if weight.name in read and name is not None:
            found.append(SpectralWeight(node.outputs[0], original, name, frozenset({node.name, *nodes})))
    return found
