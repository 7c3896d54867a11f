"""Convolutions (ONNX Conv, 1-D to 3-D, any stride, padding, dilation and group count) and transposed ones
(ConvTranspose: a block of the convolution each equals, plan.transposed_geometry).

A grouped convolution's weight is block-diagonal over groups; it gets one KFC block per group.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from kronograph.passes.graph import TracedParameter, int_attr, ints_attr, trace_bias, trace_parameter
from kronograph.passes.match.base import LayerMatch, MatchContext, bias_add, find_bias, source_location
from kronograph.passes.plan import ConvGeometry, Site, transposed_geometry

_KINDS = {3: "conv1d", 4: "conv2d", 5: "conv3d"}


def match_conv(node: ir.Node, ctx: MatchContext) -> LayerMatch | None:
    """Conv(X, W[, B]) with W a parameter reached without any layout change, or Conv(X, W) + Add(B)."""
    found = _weight_of(node, ctx, "Conv")
    if found is None:
        return None
    weight, shape = found
    spatial = len(shape) - 2
    groups = int_attr(node, "group", 1)
    out_channels, in_per_group, kernel = shape[0], shape[1], shape[2:]
    auto_pad = node.attributes.get("auto_pad")
    geometry = ConvGeometry(
        kernel=tuple(kernel),
        stride=ints_attr(node, "strides") or (1,) * spatial,
        padding=ints_attr(node, "pads") or (0,) * (2 * spatial),
        dilation=ints_attr(node, "dilations") or (1,) * spatial,
        groups=groups,
        auto_pad=auto_pad.as_string() if auto_pad is not None else "NOTSET",
    )
    return _conv_match(node, ctx, weight, "out_in", in_per_group * math.prod(kernel), out_channels, geometry)


def match_conv_transpose(node: ir.Node, ctx: MatchContext) -> LayerMatch | None:
    """ConvTranspose(X, W[, B]) with W [in, out / groups, *kernel] a parameter reached without any layout change,
    explicit pads (no auto_pad, no output_shape) and no pad larger than dilation (kernel - 1)."""
    found = _weight_of(node, ctx, "ConvTranspose")
    auto_pad = node.attributes.get("auto_pad")
    if (found is None or node.attributes.get("output_shape") is not None
            or (auto_pad is not None and auto_pad.as_string() not in ("", "NOTSET"))):
        return None
    weight, shape = found
    spatial = len(shape) - 2
    groups = int_attr(node, "group", 1)
    in_channels, out_per_group, kernel = shape[0], shape[1], shape[2:]
    pads = ints_attr(node, "pads") or (0,) * (2 * spatial)
    geometry = transposed_geometry(kernel, ints_attr(node, "strides") or (1,) * spatial, pads[:spatial],
                                   pads[spatial:], ints_attr(node, "output_padding") or (0,) * spatial,
                                   ints_attr(node, "dilations") or (1,) * spatial, groups)
    if geometry is None:
        return None
    return _conv_match(node, ctx, weight, "transposed", in_channels // groups * math.prod(kernel),
                       groups * out_per_group, geometry)


def _weight_of(node: ir.Node, ctx: MatchContext, op_type: str) -> tuple[TracedParameter, tuple[int, ...]] | None:
    """The weight parameter of an ``op_type`` node (input 1, reached without any layout change) and its shape, or
    None."""
    if node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    weight = trace_parameter(node.inputs[1], ctx.parameters)
    if weight is None or weight.transposed or len(ctx.shapes[weight.name]) not in _KINDS:
        return None
    return weight, ctx.shapes[weight.name]


def _conv_match(node: ir.Node, ctx: MatchContext, weight: TracedParameter, layout: str, in_features: int,
                out_channels: int, geometry: ConvGeometry) -> LayerMatch:
    """The LayerMatch of a (transposed) convolution at ``node``, its bias the node's own input or an Add after it."""
    spatial = len(geometry.kernel)
    output, add = node.outputs[0], ()
    if trace_bias(node, 2, ctx.parameters) is not None:  # a bias parameter as the node's own input
        bias = find_bias(ctx, node, 2, out_channels, axis=0, output_rank=1)
    else:  # no bias parameter of its own (PyTorch exports a constant zero bias): look for an Add
        bias, output, add = bias_add(ctx, node, out_channels, axis=1, output_rank=spatial + 2)
    module, call = source_location(node)
    site = Site(
        activation=node.inputs[0].name,
        preactivation=output.name,
        nodes=(*weight.nodes, node.name, *add),
        module=module,
        call=call,
    )
    return LayerMatch(
        kind=_KINDS[spatial + 2],
        weight=weight,
        bias=bias[0] if bias else None,
        weight_layout=layout,
        weight_shape=ctx.shapes[weight.name],
        in_features=in_features,
        out_features=out_channels // geometry.groups,
        site=site,
        weight_use=(node.name, 1),
        bias_use=bias[1] if bias else None,
        geometry=geometry,
    )
