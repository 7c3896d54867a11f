"""passes/match: find the linear, convolution and embedding layers of an ONNX graph and build the LayerPlan."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from kronograph.passes.graph import ensure_node_names, node_label, terminal_uses
from kronograph.passes.match.base import LayerMatch, MatchContext, Use
from kronograph.passes.match.embedding import MAX_EMBEDDING_ROWS, match_table
from kronograph.passes.match.patterns import MATCHERS
from kronograph.passes.match.spectral_norm import find_spectral_norms
from kronograph.passes.match.tied import find_ties
from kronograph.passes.match.verification import parameter_uses, parametrized, verify
from kronograph.passes.match.weight_norm import find_weight_norms
from kronograph.passes.plan import Layer, LayerPlan, Tie, Unmatched

__all__ = ["build_plan"]


#: How frameworks end a weight's name; the layer is named by what is left (``fc.weight`` -> ``fc``,
#: ``attn.in_proj_weight`` -> ``attn.in_proj``, TensorFlow's ``dense/kernel:0`` -> ``dense``).
_WEIGHT_SUFFIXES = (".weight", "_weight", "/kernel", "/weights", ".kernel")


def _layer_name(weight: str) -> str:
    name = weight[:-2] if weight.endswith(":0") and len(weight) > 2 else weight
    for suffix in _WEIGHT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _layer(name: str, sites: list[LayerMatch]) -> Layer:
    first = sites[0]
    return Layer(
        name=name,
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


def _layers(accepted: dict[str, list[LayerMatch]]) -> tuple[Layer, ...]:
    """One Layer per accepted weight, named after it; a name two weights would share falls back to the weight's."""
    names = [_layer_name(weight) for weight in accepted]
    clashes = {name for name in names if names.count(name) > 1}
    return tuple(
        _layer(weight if name in clashes else name, sites)
        for name, (weight, sites) in zip(names, accepted.items())
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
    layers = _layers(verdict.accepted)
    wide = [match for node in graph if (match := match_table(node, ctx)) is not None]  # tables past a layer's rows
    tables = _tables(graph, wide, values, set(verdict.reasons), {layer.name for layer in layers})
    uses = parameter_uses(values)
    ties = _ties([*matches, *wide], uses, set(verdict.reasons), {layer.name for layer in (*layers, *tables)})
    normed = _normed(ctx, values, uses, set(verdict.reasons),
                     {layer.name for layer in (*layers, *tables, *(tie.output for tie in ties))},
                     model.opset_imports.get("", 18))
    order = list(parameters.values()) + list(missing or {})
    reasons = dict(verdict.reasons)
    for table in tables:
        reasons[table.weight] = (f"an embedding table of {table.in_features} rows, more than {MAX_EMBEDDING_ROWS}: "
                                 "a table of the plan, a block with a diagonal A in K-FAC and KFACPreconditioner "
                                 "(table_blocks) and outside every block elsewhere")
    nodes = {node.name: node for node in graph} if ties else {}
    for tie in ties:
        table, head = (node_label(nodes[view.sites[0].nodes[-1]]) for view in tie.views)
        reasons[tie.output.weight] = (f"tied: read as an embedding table ({table}) and as the weight of an output "
                                      f"layer ({head}); K-FAC gives it one block over both uses (tied_blocks), "
                                      "outside every block elsewhere")
        if tie.output.bias:
            reasons[tie.output.bias] = (f"bias of the output layer tied to the table '{tie.output.weight}': in "
                                        "K-FAC's block of the tie, outside every block elsewhere")
    for layer in normed:
        if layer.spectral_norm:
            for name, role in ((layer.spectral_norm, "W_o"), (layer.bias, "bias")):
                if name:
                    reasons[name] = (f"spectral norm's {role} of {layer.weight} (W = W_o / sigma): K-FAC gives the "
                                     f"computed weight a block (spectral_norm_blocks), outside every block elsewhere")
            continue
        direction, magnitude = layer.weight_norm
        for name, role in ((direction, "direction v"), (magnitude, "magnitude g"), (layer.bias, "bias")):
            if name:
                reasons[name] = (f"weight norm's {role} of {layer.weight} (W = g v / |v|): K-FAC gives the computed "
                                 f"weight a block (weight_norm_blocks), outside every block elsewhere"
                                 f"{parametrized(name) if name != layer.bias else ''}")
    unmatched = [Unmatched(name, shapes[name], reasons[name]) for name in order if name in reasons]
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
        tables=tables,
        ties=ties,
        normed=normed,
    )


def _tables(graph: ir.Graph, wide: list[LayerMatch], values: dict[str, ir.Value], unmatched: set[str],
            taken: set[str]) -> tuple[Layer, ...]:
    """The embedding tables too wide for a layer of the plan (``wide``: ``match_table``'s) whose every use is a
    Gather at the graph's own indices (a table tied to an output layer is not one), as layers with a diagonal A."""
    found = [match for match in wide if match.weight.name in unmatched]
    accepted = verify(graph, found, values).accepted
    return tuple(layer if layer.name not in taken else dataclasses.replace(layer, name=layer.weight)
                 for layer in _layers(accepted))


def _ties(matches: list[LayerMatch], uses: dict[str, set[Use]], unmatched: set[str], taken: set[str]
          ) -> tuple[Tie, ...]:
    """The weights turned down as tables tied to an output layer (passes/match/tied.py), as Ties of two Layers."""
    found = find_ties(matches, uses, [name for name in uses if name in unmatched])
    ties = []
    for weight, (table, head) in found.items():
        name = _layer_name(weight)
        name = weight if name in taken else name
        ties.append(Tie(name, _layer(f"{name}[embedding]", table), _layer(f"{name}[output]", head)))
    return tuple(ties)


def _normed(ctx: MatchContext, values: dict[str, ir.Value], uses: dict[str, set[Use]], unmatched: set[str],
            taken: set[str], opset: int) -> tuple[Layer, ...]:
    """The layers whose weight weight norm (passes/match/weight_norm.py) or spectral norm (passes/match/
    spectral_norm.py) computes, matched on that computed weight as on a parameter: where the parameters are read by
    the norm alone and every use of W is a site of one layer."""
    found = []
    for normed in find_weight_norms(ctx.graph, ctx.parameters, ctx.shapes, opset):
        reader, divide, multiply = normed.nodes
        read_by_norm = ({node for node, _ in uses[normed.direction]} == {reader, multiply}
                        and {node for node, _ in uses[normed.magnitude]} == {divide})
        if read_by_norm and {normed.direction, normed.magnitude} <= unmatched:
            found += _computed(ctx, values, unmatched, taken, normed.value, normed.name, normed.direction,
                               weight_norm=(normed.direction, normed.magnitude))
    for normed in find_spectral_norms(ctx.graph, ctx.parameters, ctx.shapes):
        if normed.original in unmatched and {node for node, _ in uses[normed.original]} <= normed.nodes:
            found += _computed(ctx, values, unmatched, taken, normed.value, normed.name, normed.original,
                               spectral_norm=normed.original)
    return tuple(found)


def _computed(ctx: MatchContext, values: dict[str, ir.Value], unmatched: set[str], taken: set[str], value: ir.Value,
              name: str, like: str, **norm: Any) -> list[Layer]:
    """The layer whose weight is the computed ``value`` (named ``name``, shaped as the parameter ``like``), with
    ``norm`` (its ``weight_norm`` or ``spectral_norm``): none unless every use of it is a site and its bias is free."""
    derived = MatchContext(ctx.graph, {**ctx.parameters, value.name: name}, {**ctx.shapes, name: ctx.shapes[like]})
    first = (next((m for matcher in MATCHERS if (m := matcher(node, derived)) is not None), None)
             for node, _ in terminal_uses(value))
    sites = [match for match in first if match is not None and match.weight.name == name]
    biases = {site.bias.name for site in sites if site.bias}
    if not biases <= unmatched:
        return []
    accepted = verify(ctx.graph, sites, {name: value, **{b: values[b] for b in biases}}).accepted
    return [dataclasses.replace(layer, name=layer.weight if layer.name in taken else layer.name, **norm)
            for layer in _layers(accepted)]
