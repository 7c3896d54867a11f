"""Linear layers: Gemm (any transA/transB), and MatMul with an optional bias Add.

PyTorch exports nn.Linear / F.linear as Gemm for 2-D inputs and as Transpose(W) + MatMul + Add for
sequences; TensorFlow, JAX and hand-built graphs use MatMul with an [in, out] weight and an Add.
"""

from __future__ import annotations

import onnx_ir as ir

from kronograph.passes.graph import (
    TracedParameter,
    float_attr,
    int_attr,
    rank,
    single_consumer,
    trace_parameter,
)
from kronograph.passes.match.base import LayerMatch, MatchContext, source_location
from kronograph.passes.plan import Site


def _weight_matrix(ctx: MatchContext, value: ir.Value, transposed_by_node: bool):
    """The traced 2-D weight and its layout, given how the consuming node reads it.

    The node computes x @ M with M of shape [in, out]; M is the parameter, transposed once for each
    transpose (node attribute or Transpose op) on the way.
    """
    traced = trace_parameter(value, ctx.parameters)
    if traced is None:
        return None
    shape = ctx.shapes[traced.name]
    if len(shape) != 2:
        return None
    flips = traced.transposed != transposed_by_node
    layout = "out_in" if flips else "in_out"
    out_features, in_features = shape if flips else shape[::-1]
    return traced, layout, shape, in_features, out_features


def _bias(ctx: MatchContext, value: ir.Value | None, out_features: int) -> TracedParameter | None:
    """A bias parameter of shape [out] (or [1, out]) behind ``value``."""
    traced = trace_parameter(value, ctx.parameters)
    if traced is None or traced.transposed:
        return None
    shape = ctx.shapes[traced.name]
    if shape not in ((out_features,), (1, out_features)):
        return None
    return traced


def match_gemm(node: ir.Node, ctx: MatchContext) -> LayerMatch | None:
    """Y = alpha * A' B' + beta * C with the weight in B. Scaled forms (alpha, beta != 1) are left out."""
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
        return None
    if float_attr(node, "alpha", 1.0) != 1.0:
        return None
    weight = _weight_matrix(ctx, node.inputs[1], bool(int_attr(node, "transB", 0)))
    if weight is None or trace_parameter(node.inputs[0], ctx.parameters) is not None:
        return None
    traced, layout, shape, in_features, out_features = weight
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None and float_attr(node, "beta", 1.0) == 1.0:
        bias = _bias(ctx, node.inputs[2], out_features)
    module, call = source_location(node)
    site = Site(
        activation=node.inputs[0].name,
        preactivation=node.outputs[0].name,
        nodes=(*traced.nodes, node.name),
        activation_transposed=bool(int_attr(node, "transA", 0)),
        module=module,
        call=call,
    )
    return LayerMatch(
        kind="linear",
        weight=traced,
        bias=bias,
        weight_layout=layout,
        weight_shape=shape,
        in_features=in_features,
        out_features=out_features,
        site=site,
        weight_use=(node.name, 1),
        bias_use=(node.name, 2) if bias else None,
    )


def match_matmul(node: ir.Node, ctx: MatchContext) -> LayerMatch | None:
    """x @ W (x of rank >= 2, W a 2-D parameter), then an optional Add of a [out] bias."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    weight = _weight_matrix(ctx, node.inputs[1], False)
    x_rank = rank(node.inputs[0])
    if weight is None or (x_rank is not None and x_rank < 2):
        return None
    if trace_parameter(node.inputs[0], ctx.parameters) is not None:
        return None
    traced, layout, shape, in_features, out_features = weight
    output = node.outputs[0]
    bias = bias_use = None
    nodes = [*traced.nodes, node.name]
    add = single_consumer(output)
    if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
        other_index = 1 if add.inputs[0] is output else 0
        bias = _bias(ctx, add.inputs[other_index], out_features)
        if bias is not None:
            bias_use = (add.name, other_index)
            output = add.outputs[0]
            nodes.append(add.name)
    module, call = source_location(node)
    site = Site(
        activation=node.inputs[0].name,
        preactivation=output.name,
        nodes=tuple(nodes),
        module=module,
        call=call,
    )
    return LayerMatch(
        kind="linear",
        weight=traced,
        bias=bias,
        weight_layout=layout,
        weight_shape=shape,
        in_features=in_features,
        out_features=out_features,
        site=site,
        weight_use=(node.name, 1),
        bias_use=bias_use,
    )
