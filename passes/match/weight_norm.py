"""Weight-normed layers: a linear or convolution layer whose weight is computed as W = g v / |v| (PyTorch's
``weight_norm``: the norm over every axis but ``dim``, 0 by default, or over all of v for dim=None), the graph's
Mul(v, Div(g, ReduceL2(v))), or with the norm through reshapes and transposes (a conv's dim=1), read by its values.

Coverage turns v and g down (ReduceL2, Div and Mul are no layer's sites), yet the layer is an ordinary Kronecker
layer of its computed weight W: the same a and g, the same Fisher block in W's coordinates. The map (g, v) -> W
covers every direction of W a group at a time (a slice along dim, or all of v; u = v / |v| there: dW = u dg +
(g / |v|) (I - u u^T) dv), so a step in W
is exactly a step in (g, v), and K-FAC's natural step in W pulled back (runtime/weight_norm.py) is the natural
step of the weight-normed parameters. Here the computed weight is matched as if it were a parameter, named as the
module's attribute (``fc.weight``); the layer keeps v and g as ``Layer.weight_norm``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kronograph.passes.graph import int_attr, static_shape, terminal_uses

_PARAMETRIZED = re.compile(r"^(.*)\.parametrizations\.([^.]+)\.original[01]$")


@dataclass(frozen=True)
class NormedWeight:
    """A weight computed by weight norm in the graph: the Mul's output ``value``, its parameters and nodes."""

    value: ir.Value
    direction: str  # v, [out, ...]
    magnitude: str  # g, v's shape with 1 on the norm's axes ([out, 1, ..., 1] for dim=0), or a scalar
    name: str  # the computed weight's name: the module attribute (``fc.weight``)
    nodes: tuple[str, ...]  # the norm's reader of v (ReduceL2, or the Reshape flattening v for it), Div, Mul


def computed_name(direction: str) -> str:
    """The module attribute a weight-norm direction parameter computes: ``fc.parametrizations.weight.original1``
    (torch.nn.utils.parametrizations.weight_norm) and ``fc.weight_v`` (the older torch.nn.utils.weight_norm) both
    give ``fc.weight``."""
    found = _PARAMETRIZED.match(direction)
    if found:
        return f"{found.group(1)}.{found.group(2)}"
    return direction[: -len("_v")] if direction.endswith("_v") else f"{direction}[normed]"


def _parameter(value: ir.Value | None, parameters: dict[str, str]) -> str | None:
    if value is None or value.name not in parameters or value.producer() is not None:
        return None
    return parameters[value.name]


def _norm_of(reduce: ir.Node, direction: str, parameters: dict[str, str], shape: tuple[int, ...],
             magnitude_shape: tuple[int, ...]) -> ir.Node | None:
    """The node that reads v for the ReduceL2 ``reduce`` when it is the norm weight norm divides g by, else None:
    v itself, the norm kept over the axes where g has size 1 (dim=k: g [1, ..., n_k, ..., 1]; dim=0 the common
    one), or v (or a Reshape of v read by the norm alone) reduced whole to a scalar (dim=None: g a scalar)."""
    source = reduce.inputs[0]
    if _parameter(source, parameters) == direction:
        reader = reduce
    else:
        reader = source.producer() if source is not None else None
        if (reader is None or reader.op_type != "Reshape" or reader.domain not in ("", "ai.onnx")
                or _parameter(reader.inputs[0], parameters) != direction
                or {node for node, _ in source.uses()} != {reduce}):
            return None
    out = static_shape(reduce.outputs[0])
    if int_attr(reduce, "keepdims", 1) == 1:
        kept = len(magnitude_shape) == len(shape) and all(m in (1, n) for m, n in zip(magnitude_shape, shape))
        return reduce if reader is reduce and kept and out == magnitude_shape else None
    whole = len(reduce.inputs) < 2 or reduce.inputs[1] is None  # no axes: every axis (noop_with_empty_axes 0)
    return reader if whole and int_attr(reduce, "noop_with_empty_axes", 0) == 0 and magnitude_shape == () == out else None


#: what a norm's own arithmetic may be made of when it is not one ReduceL2 (a conv's dim=1: PyTorch's export
#: transposes v, flattens it, reduces and transposes back); its constants are read by onnx's reference evaluator
_NORM_OPS = {"Constant", "Concat", "Reshape", "Transpose", "Identity", "ReduceL2", "Squeeze", "Unsqueeze", "Cast"}


def _evaluated_norm(graph: ir.Graph, divisor: ir.Value, direction: ir.Value, magnitude_shape: tuple[int, ...],
                    opset: int) -> ir.Node | None:
    """The node that reads v (as coverage sees it, through transposes) for the divisor when the divisor is |v| over
    the axes where g has size 1, shaped as g, made of reshapes, transposes and one ReduceL2 of v and constants
    alone: evaluated by onnx's reference evaluator on a random v against numpy's norm; else None."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    nodes, stack = {}, [divisor.producer()]
    while stack:
        node = stack.pop()
        if node is None or node.name in nodes:
            continue
        if node.op_type not in _NORM_OPS or node.domain not in ("", "ai.onnx"):
            return None
        nodes[node.name] = node
        for source in node.inputs:
            if source is None or source is direction:
                continue
            if source.producer() is None:  # another parameter or a graph input: not a norm of v alone
                return None
            stack.append(source.producer())
    readers = {node.name for node, _ in terminal_uses(direction)} & nodes.keys()  # (as coverage sees v's uses)
    shape, dtype = static_shape(direction), direction.dtype
    if (len(readers) != 1 or sum(node.op_type == "ReduceL2" for node in nodes.values()) != 1 or shape is None
            or dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE)):
        return None
    ordered = [node for node in graph if node.name in nodes]  # (the graph's order is topological)
    subgraph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in ordered], "norm",
        [onnx.helper.make_tensor_value_info(direction.name, int(dtype), shape)],
        [onnx.helper.make_tensor_value_info(divisor.name, int(dtype), None)])
    v = np.random.default_rng(0).standard_normal(shape).astype(dtype.numpy())
    try:
        (found,) = ReferenceEvaluator(onnx.helper.make_model(
            subgraph, opset_imports=[onnx.helper.make_opsetid("", opset)])).run(None, {direction.name: v})
    except Exception:  # (an op the evaluator cannot run here: no block rather than a failed compile)
        return None
    axes = tuple(axis for axis, size in enumerate(magnitude_shape) if size == 1)
    expected = np.sqrt((v.astype(np.float64) ** 2).sum(axis=axes, keepdims=True))
    if len(magnitude_shape) != len(shape) or found.shape != expected.shape or not np.allclose(found, expected, 1e-5):
        return None
    return nodes[min(readers)]


def find_weight_norms(graph: ir.Graph, parameters: dict[str, str], shapes: dict[str, tuple[int, ...]],
                      opset: int = 18) -> list[NormedWeight]:
    """Every Mul(v, Div(g, |v|)) (either Mul operand order) of two parameters: the norm a ReduceL2 over the axes
    where g has size 1 with its dims kept, or over the whole of v with g a scalar (``_norm_of``), or over the axes
    where g has size 1 through reshapes and transposes (``_evaluated_norm``: a conv's dim=1)."""
    found = []
    for node in graph:
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        for index in (0, 1):
            direction = _parameter(node.inputs[index], parameters)
            div = node.inputs[1 - index].producer() if node.inputs[1 - index] is not None else None
            if direction is None or div is None or div.op_type != "Div" or div.domain not in ("", "ai.onnx"):
                continue
            magnitude = _parameter(div.inputs[0], parameters)
            reduce = div.inputs[1].producer() if div.inputs[1] is not None else None
            if magnitude is None or reduce is None or len(shapes[direction]) < 2:
                continue
            if reduce.op_type == "ReduceL2":
                reader = _norm_of(reduce, direction, parameters, shapes[direction], shapes[magnitude])
            else:
                reader = _evaluated_norm(graph, div.inputs[1], node.inputs[index], shapes[magnitude], opset)
            if reader is None:
                continue
            found.append(NormedWeight(node.outputs[0], direction, magnitude, computed_name(direction),
                                      (reader.name, div.name, node.name)))
            break
    return found
