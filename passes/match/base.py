"""What every matcher returns, and the context it reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

from kronograph.passes.graph import (
    TracedParameter,
    broadcasts_along,
    rank,
    single_consumer,
    static_shape,
    trace_bias,
)
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


def find_bias(
    ctx: MatchContext, node: ir.Node, index: int, size: int, axis: int, output_rank: int | None
) -> tuple[TracedParameter, Use] | None:
    """The bias parameter that input ``index`` of ``node`` adds along ``axis`` of the layer's output.

    It must hold ``size`` entries (one per output feature) and, where it is added, have a shape that
    broadcasts along ``axis`` only: a [C] vector added to a [N, C, H, W] convolution output would run
    along W, which is not a bias. Reshapes between the parameter and ``node`` are seen through.
    Args:
        output_rank: rank of the layer's output; None when unknown (then the bias's own rank is used).
    Returns:
        (the parameter, its use as the coverage check sees it), or None.
    """
    found = trace_bias(node, index, ctx.parameters)
    if found is None:
        return None
    traced, use = found
    shape = ctx.shapes[traced.name]
    if math.prod(shape) != size:
        return None
    reshaped = use != (node.name, index)
    added = static_shape(node.inputs[index]) if reshaped else shape
    if added is None:
        return None
    rank = output_rank if output_rank is not None else len(added)
    return found if broadcasts_along(added, rank, axis, size) else None


def bias_add(
    ctx: MatchContext, node: ir.Node, size: int, axis: int, output_rank: int | None = None
) -> tuple[tuple[TracedParameter, Use] | None, ir.Value, tuple[str, ...]]:
    """A bias added right after ``node`` by an Add that is its only consumer (MatMul + Add, or the
    Conv + Add(bias reshaped to [1, C, 1, 1]) that converters from other frameworks emit).

    Args:
        output_rank: rank of the layer's output; None to read it from the Add's output.
    Returns:
        (the bias and its use, or None; the pre-activation: the Add's output or ``node``'s; the Add's
        name, or () when there is no bias Add).
    """
    output = node.outputs[0]
    add = single_consumer(output)
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None, output, ()
    other = 1 if add.inputs[0] is output else 0
    if output_rank is None:
        output_rank = rank(add.outputs[0])
    bias = find_bias(ctx, add, other, size, axis, output_rank)
    if bias is None:
        return None, output, ()
    return bias, add.outputs[0], (add.name,)


def source_location(node: ir.Node) -> tuple[str, str]:
    """(module path, call name) of a node exported from PyTorch, from the exporter's metadata.

    The dynamo exporter writes ``namespace`` as
    ``": pkg.Root/enc: ...Layer/enc.attn: ...Attention/linear_1: aten.linear.default"``: the first entry
    is the root, the last the op call, and every entry between is a submodule named by its full path
    (``enc.attn``, not ``attn``), so the innermost one is the module path.
    """
    namespace = node.metadata_props.get("namespace", "")
    if not namespace:
        return "", ""
    entries = [entry.split(":", 1)[0].strip() for entry in namespace.split("/")]
    if len(entries) < 2:
        return "", ""
    module = entries[-2] if len(entries) > 2 else ""
    return module, entries[-1]
