"""Linear layers: Gemm (any transA/transB), and MatMul or Einsum with an optional bias Add.

PyTorch exports nn.Linear / F.linear as Gemm for 2-D inputs and as Transpose(W) + MatMul + Add for
sequences, and torch.einsum as Einsum; TensorFlow, JAX and hand-built graphs use MatMul with an [in, out]
weight and an Add.
"""

from __future__ import annotations

import onnx_ir as ir

from kronograph.passes.graph import (
    TracedParameter,
    float_attr,
    int_attr,
    rank,
    trace_parameter,
)
from kronograph.passes.match.base import LayerMatch, MatchContext, Use, bias_add, find_bias, source_location
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


def match_gemm(node: ir.Node, ctx: MatchContext) -> LayerMatch | None:
    """Y = alpha * A' B' + beta * C with the weight in B. Scaled forms (alpha, beta != 1) are left out."""
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
        return None
    if float_attr(node, "alpha", 1.0) != 1.0:
        return None
    weight = _weight_matrix(ctx, node.inputs[1], bool(int_attr(node, "transB", 0)))
    if weight is None or trace_parameter(node.inputs[0], ctx.parameters) is not None:
        return None
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None and float_attr(node, "beta", 1.0) == 1.0:
        bias = find_bias(ctx, node, 2, weight[4], axis=-1, output_rank=2)
    return _layer_match(
        node, weight, 1, node.inputs[0], bias, node.outputs[0], (), bool(int_attr(node, "transA", 0))
    )


def _layer_match(
    node: ir.Node,
    weight: tuple[TracedParameter, str, tuple[int, ...], int, int],
    weight_index: int,
    activation: ir.Value,
    bias: tuple[TracedParameter, Use] | None,
    preactivation: ir.Value,
    bias_nodes: tuple[str, ...],
    activation_transposed: bool = False,
) -> LayerMatch:
    """The LayerMatch of a linear site at ``node`` reading ``weight`` (as ``_weight_matrix`` returns it)."""
    traced, layout, shape, in_features, out_features = weight
    module, call = source_location(node)
    site = Site(
        activation=activation.name,
        preactivation=preactivation.name,
        nodes=(*traced.nodes, node.name, *bias_nodes),
        activation_transposed=activation_transposed,
        module=module,
        call=call,
    )
    return LayerMatch(
        kind="linear",
        weight=traced,
        bias=bias[0] if bias else None,
        weight_layout=layout,
        weight_shape=shape,
        in_features=in_features,
        out_features=out_features,
        site=site,
        weight_use=(node.name, weight_index),
        bias_use=bias[1] if bias else None,
    )


def _linear_match(
    node: ir.Node,
    ctx: MatchContext,
    activation: ir.Value,
    weight: tuple[TracedParameter, str, tuple[int, ...], int, int],
    weight_index: int,
) -> LayerMatch:
    """The LayerMatch of ``node`` (MatMul or Einsum) reading ``weight`` and an optional bias Add after it."""
    bias, output, add = bias_add(ctx, node, weight[4], axis=-1)
    return _layer_match(node, weight, weight_index, activation, bias, output, add)


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
    return _linear_match(node, ctx, node.inputs[0], weight, 1)


def _einsum_terms(node: ir.Node) -> tuple[str, str, str] | None:
    """(first input, second input, output) subscripts of a two-operand Einsum with an explicit output.

    ``...`` becomes the single character ``*`` so that every term is a string of one-character axes.
    """
    attr = node.attributes.get("equation")
    if attr is None:
        return None
    equation = attr.as_string().replace(" ", "").replace("...", "*")
    if "->" not in equation:
        return None
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        return None
    return terms[0], terms[1], output


def _einsum_axes(x: str, w: str, out: str) -> tuple[str, str] | None:
    """(in axis, out axis) when x[..., i] and a 2-D w over {i, o} give out[..., o]: a linear layer.

    The contracted axis must be the last of x and the new axis the last of the output, with every
    other axis of x kept in place: then the activation and pre-activation have their features last,
    as for MatMul. Any other contraction (batched weights, attention products) is not a layer.
    """
    if len(w) != 2 or w[0] == w[1] or "*" in w or len(x) < 2 or len(set(x)) != len(x):
        return None
    i = x[-1]
    if i not in w:
        return None
    o = w[1] if w[0] == i else w[0]
    if o in x or out != x[:-1] + o:
        return None
    return i, o


def match_einsum(node: ir.Node, ctx: MatchContext) -> LayerMatch | None:
    """Einsum("...i,oi->...o", x, W) (either operand order, W as [out, in] or [in, out]), optional bias Add.

    The dynamo exporter keeps ``torch.einsum`` as one Einsum node; TensorFlow's EinsumDense does too.
    """
    if node.op_type != "Einsum" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    terms = _einsum_terms(node)
    if terms is None:
        return None
    for weight_index in (1, 0):
        data_index = 1 - weight_index
        traced = trace_parameter(node.inputs[weight_index], ctx.parameters)
        if traced is None or trace_parameter(node.inputs[data_index], ctx.parameters) is not None:
            continue
        shape = ctx.shapes[traced.name]
        axes = _einsum_axes(terms[data_index], terms[weight_index], terms[2])
        if len(shape) != 2 or axes is None:
            continue
        stored = terms[weight_index][::-1] if traced.transposed else terms[weight_index]
        i, o = axes
        layout = "out_in" if stored == o + i else "in_out"
        weight = (traced, layout, shape, shape[stored.index(i)], shape[stored.index(o)])
        return _linear_match(node, ctx, node.inputs[data_index], weight, weight_index)
    return None
