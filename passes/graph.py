"""Small queries on an onnx_ir graph that the matchers and the coverage check share.

Exporters put layout ops between a parameter and its use (PyTorch's linear becomes Transpose + MatMul,
mixed precision adds Cast, old exporters add Identity). These helpers see through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

#: Ops that move or re-type a weight without mixing its entries with anything else.
PASS_THROUGH = frozenset({"Identity", "Cast", "Transpose"})

#: (op, input index) pairs that read only a tensor's shape or type, never its values: no gradient flows
#: through them. The dynamo exporter builds the zero bias of a bias-free convolution from
#: Shape(weight); CastLike(x, w) reads only w's element type.
METADATA_ONLY = {("Shape", 0), ("Size", 0), ("CastLike", 1)}

#: Ops whose output (from their first input) is that input's entries moved, re-typed or a subset of them, never
#: mixed with one another: a layer's output seen through them is still that layer's output.
REARRANGES = PASS_THROUGH | {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice"}


def reads_metadata_only(node: ir.Node, index: int) -> bool:
    """Whether input ``index`` of ``node`` is read for its shape or type only (not a use of its values)."""
    return node.domain in ("", "ai.onnx") and (node.op_type, index) in METADATA_ONLY


@dataclass(frozen=True)
class TracedParameter:
    """The parameter behind a node input, and whether a 2-D transpose lies between them."""

    name: str  # parameter name in the source model
    transposed: bool
    nodes: tuple[str, ...]  # the pass-through nodes crossed


def is_plain_transpose(node: ir.Node) -> bool:
    """A Transpose that swaps the two axes of a matrix (the only layout change we see through)."""
    perm = node.attributes.get("perm")
    return perm is None or list(perm.as_ints()) == [1, 0]


def trace_parameter(value: ir.Value | None, parameters: dict[str, str]) -> TracedParameter | None:
    """Follow ``value`` back through pass-through ops to a trainable initializer.

    ``parameters`` maps initializer names to the source model's parameter names. A Transpose with any
    other permutation than [1, 0] stops the trace (the weight is no longer a plain matrix).
    """
    transposed = False
    crossed: list[str] = []
    while value is not None:
        # (an initializer, or a weight computed from parameters that the caller names as one: weight norm's W)
        if value.name in parameters:
            return TracedParameter(parameters[value.name], transposed, tuple(crossed))
        node = value.producer()
        if node is None or node.op_type not in PASS_THROUGH or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Transpose":
            if not is_plain_transpose(node):
                return None
            transposed = not transposed
        crossed.append(node.name or "")
        value = node.inputs[0]
    return None


#: Ops that give a bias vector another shape without reordering or mixing its entries. Converters from
#: other frameworks add a convolution's bias after the Conv, reshaped to [1, C, 1, 1] for broadcasting.
RESHAPES = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten"})
_BIAS_STEPS = frozenset({"Identity", "Cast"}) | RESHAPES


def broadcasts_along(shape: tuple[int, ...], output_rank: int, axis: int, size: int) -> bool:
    """Whether a tensor of ``shape``, broadcast against a rank ``output_rank`` tensor, varies along
    ``axis`` only, with ``size`` entries: what a bias of ``size`` output features must do."""
    if len(shape) > output_rank:
        return False
    padded = (1,) * (output_rank - len(shape)) + tuple(shape)
    return all(dim == (size if k == axis % output_rank else 1) for k, dim in enumerate(padded))


def trace_bias(
    node: ir.Node, index: int, parameters: dict[str, str]
) -> tuple[TracedParameter, tuple[str, int]] | None:
    """The bias parameter behind input ``index`` of ``node``, through pass-through ops and reshapes.

    Returns the parameter and its use as ``terminal_uses`` reports it: ``(node, index)`` when only
    pass-through ops lie between, else the reshape nearest the parameter, input 0. Every value from
    that reshape on must feed only the next op of the chain: a use that ``terminal_uses`` does not
    see (it stops at the reshape) must not be able to hide behind it.
    """
    chain: list[ir.Node] = []  # from ``node`` back towards the parameter
    value = node.inputs[index] if index < len(node.inputs) else None
    while value is not None:
        if value.name in parameters and (value.is_initializer() or value.producer() is None):
            break
        producer = value.producer()
        if producer is None or producer.domain not in ("", "ai.onnx"):
            return None
        if producer.op_type not in _BIAS_STEPS:
            return None
        chain.append(producer)
        value = producer.inputs[0]
    if value is None:
        return None
    use = (node.name, index)
    reshaped = False
    for step in reversed(chain):  # from the parameter towards ``node``
        if step.op_type in RESHAPES and not reshaped:
            reshaped, use = True, (step.name, 0)
        if reshaped and single_consumer(step.outputs[0]) is None:
            return None
    crossed = tuple(step.name for step in reversed(chain))
    return TracedParameter(parameters[value.name], False, crossed), use


def terminal_uses(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """Every (node, input index) that consumes the values of ``value``, looking through pass-through ops.

    Shape-only reads (``reads_metadata_only``) are left out: they carry no gradient, so they neither
    explain nor spoil a layer's use of a weight.
    """
    found: list[tuple[ir.Node, int]] = []
    stack = [value]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for use in current.uses():
            node, index = use.node, use.idx
            if reads_metadata_only(node, index):
                continue
            if node.op_type in PASS_THROUGH and node.domain in ("", "ai.onnx") and index == 0:
                stack.extend(node.outputs)
            else:
                found.append((node, index))
    return found


def single_consumer(value: ir.Value) -> ir.Node | None:
    """The only node reading ``value``, or None when there are none or several, or it is an output."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of ``value`` when every dimension is a known integer."""
    if value is None or value.shape is None:
        return None
    dims = []
    for dim in value.shape:
        if not isinstance(dim, int):
            return None
        dims.append(dim)
    return tuple(dims)


def rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.as_int())


def float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.as_float())


def ints_attr(node: ir.Node, name: str) -> tuple[int, ...] | None:
    attr = node.attributes.get(name)
    return None if attr is None else tuple(int(v) for v in attr.as_ints())


def node_label(node: ir.Node) -> str:
    """How error messages and reasons name a node."""
    return f"{node.op_type} node '{node.name}'" if node.name else f"a {node.op_type} node"


def ensure_node_names(graph: ir.Graph) -> None:
    """Give every node a unique name so that sites and reasons can refer to nodes."""
    taken = {node.name for node in graph if node.name}
    counter = 0
    for node in graph:
        if not node.name:
            while f"{node.op_type}_{counter}" in taken:
                counter += 1
            node.name = f"{node.op_type}_{counter}"
            taken.add(node.name)


def rearranged_from(value: ir.Value) -> set[str]:
    """The names of ``value`` and of every value it is a rearrangement of (``REARRANGES``' first input, followed
    back to the first producer that mixes entries)."""
    names = set()
    while value is not None:
        names.add(value.name)
        producer = value.producer()
        if producer is None or producer.op_type not in REARRANGES or producer.domain not in ("", "ai.onnx"):
            break
        value = producer.inputs[0] if producer.inputs else None
    return names
