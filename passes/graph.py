"""Small queries on an onnx_ir graph that the matchers and the coverage check share.

Exporters put layout ops between a parameter and its use (PyTorch's linear becomes Transpose + MatMul,
mixed precision adds Cast, old exporters add Identity). These helpers see through them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

#: Ops that move or re-type a weight without mixing its entries with anything else.
PASS_THROUGH = frozenset({"Identity", "Cast", "Transpose"})


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
        if value.name in parameters and (value.is_initializer() or value.producer() is None):
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


def terminal_uses(value: ir.Value) -> list[tuple[ir.Node, int]]:
    """Every (node, input index) that consumes ``value``, looking through pass-through ops."""
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
