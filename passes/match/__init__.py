"""passes/match: find the linear and convolution layers of an ONNX graph and build the LayerPlan."""

from __future__ import annotations

import onnx_ir as ir

from kronograph.passes.graph import ensure_node_names
from kronograph.passes.match.base import LayerMatch, MatchContext
from kronograph.passes.match.patterns import MATCHERS
from kronograph.passes.match.verification import verify
from kronograph.passes.plan import Layer, LayerPlan, Unmatched

__all__ = ["build_plan"]


def _layer_name(weight: str) -> str:
    for suffix in (".weight", "/kernel", ":0"):
        if weight.endswith(suffix) and len(weight) > len(suffix):
            return weight[: -len(suffix)]
    return weight


def _layer(sites: list[LayerMatch]) -> Layer:
    first = sites[0]
    return Layer(
        name=_layer_name(first.weight.name),
        kind=first.kind,
        weight=first.weight.name,
        bias=first.bias.name if first.bias else None,
        weight_shape=first.weight_shape,
        weight_layout=first.weight_layout,
        in_features=first.in_features,
        out_features=first.out_features,
        sites=tuple(match.site for match in sites),
        geometry=first.geometry,
    )


def build_plan(
    model: ir.Model,
    parameters: dict[str, str],
    missing: dict[str, tuple[int, ...]] | None = None,
) -> LayerPlan:
    """Match every node, verify coverage, and return the plan.

    Args:
        model: the graph (node names are filled in where empty).
        parameters: trainable initializer name -> the source model's parameter name, in model order.
        missing: trainable parameters of the source model that the graph does not contain, with shapes.
    Returns:
        The LayerPlan: layers in graph order, every other trainable parameter unmatched with a reason.
    """
    graph = model.graph
    ensure_node_names(graph)
    values = {parameters[name]: graph.initializers[name] for name in parameters}
    shapes = {name: tuple(int(d) for d in value.shape) for name, value in values.items()}
    ctx = MatchContext(graph=graph, parameters=dict(parameters), shapes=shapes)

    matches: list[LayerMatch] = []
    for node in graph:
        for matcher in MATCHERS:
            found = matcher(node, ctx)
            if found is not None:
                matches.append(found)
                break

    verdict = verify(graph, matches, values)
    layers = tuple(_layer(sites) for sites in verdict.accepted.values())
    order = list(parameters.values()) + list(missing or {})
    unmatched = [Unmatched(name, shapes[name], verdict.reasons[name]) for name in order if name in verdict.reasons]
    unmatched += [
        Unmatched(name, tuple(shape), "not in the exported graph (the forward pass does not use it)")
        for name, shape in (missing or {}).items()
    ]
    return LayerPlan(
        layers=layers,
        unmatched=tuple(unmatched),
        parameters=tuple(order),
        inputs=tuple(v.name for v in graph.inputs if not v.is_initializer()),
        outputs=tuple(v.name for v in graph.outputs),
    )
