"""What every matcher returns, and the context it reads."""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from kronograph.passes.graph import TracedParameter
from kronograph.passes.plan import ConvGeometry, Site

#: (node name, input index): one use of a parameter that a match explains.
Use = tuple[str, int]


@dataclass(frozen=True)
class MatchContext:
    """``parameters`` maps trainable initializer names to the source model's parameter names."""

    graph: ir.Graph
    parameters: dict[str, str]
    shapes: dict[str, tuple[int, ...]]  # parameter name -> shape


@dataclass(frozen=True)
class LayerMatch:
    """One site of a linear or convolution layer, found at one node."""

    kind: str
    weight: TracedParameter
    bias: TracedParameter | None
    weight_layout: str
    weight_shape: tuple[int, ...]
    in_features: int
    out_features: int
    site: Site
    weight_use: Use
    bias_use: Use | None
    geometry: ConvGeometry | None = None


def source_location(node: ir.Node) -> tuple[str, str]:
    """(module path, call name) of a node exported from PyTorch, from the exporter's metadata.

    The dynamo exporter writes ``namespace`` as ``": pkg.Root/fc1: torch.nn...Linear/linear: aten..."``:
    every entry but the first (the root) and the last (the op call) is a submodule.
    """
    namespace = node.metadata_props.get("namespace", "")
    if not namespace:
        return "", ""
    entries = [entry.split(":", 1)[0].strip() for entry in namespace.split("/")]
    if len(entries) < 2:
        return "", ""
    return ".".join(entries[1:-1]), entries[-1]
