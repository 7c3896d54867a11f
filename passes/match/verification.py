"""Coverage: every use of every trainable parameter is explained by a matched layer, or it is unmatched.

Matching finds candidate layer sites node by node; this pass decides which survive. A weight keeps its
Kronecker block only when all of its uses are sites of the same layer (several sites = weight sharing,
pooled as in KFAC-expand). A weight also read by anything else (a tied embedding's Gather, a custom op)
loses its block, and the reason names the first node that no pattern explains.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import onnx_ir as ir

from kronograph.passes.graph import node_label, terminal_uses
from kronograph.passes.match.base import LayerMatch, Use


@dataclass(frozen=True)
class Verdict:
    accepted: dict[str, list[LayerMatch]]  # weight name -> its sites, all consistent
    reasons: dict[str, str]  # parameter name -> why it has no block


def _describe(use: Use, nodes: dict[str, ir.Node]) -> str:
    node_name, index = use
    if node_name == "<graph output>":
        return "it is a graph output"
    return f"{node_label(nodes[node_name])} reads it as input {index}"


def _signature(match: LayerMatch) -> tuple:
    return (match.kind, match.weight_layout, match.bias.name if match.bias else None, match.geometry)


def parameter_uses(values: dict[str, ir.Value]) -> dict[str, set[Use]]:
    """Every use of each parameter (seen through reshapes and transposes), a graph output as ``<graph output>``."""
    uses: dict[str, set[Use]] = {}
    for name, value in values.items():
        found = {(node.name, index) for node, index in terminal_uses(value)}
        if value.is_graph_output():
            found.add(("<graph output>", 0))
        uses[name] = found
    return uses


def alike(sites: list[LayerMatch]) -> bool:
    """Whether the sites agree in kind, layout, bias and geometry (one layer's sites must)."""
    return len({_signature(site) for site in sites}) == 1


def verify(
    graph: ir.Graph,
    matches: list[LayerMatch],
    values: dict[str, ir.Value],
) -> Verdict:
    """Keep the matches whose parameters are fully explained; say why every other parameter is not.

    ``values`` maps each trainable parameter name to its initializer value in ``graph``.
    """
    nodes = {node.name: node for node in graph}
    uses = parameter_uses(values)

    by_weight: dict[str, list[LayerMatch]] = defaultdict(list)
    for match in matches:
        by_weight[match.weight.name].append(match)

    reasons: dict[str, str] = {}
    accepted: dict[str, list[LayerMatch]] = {}
    for weight, sites in by_weight.items():
        explained = {site.weight_use for site in sites}
        extra = sorted(uses[weight] - explained)
        if extra:
            layer_node = sites[0].site.nodes[-1]
            reasons[weight] = (
                f"shared: a layer at node '{layer_node}' uses it, but {_describe(extra[0], nodes)}; "
                "a weight with a use that is not a linear, convolution or embedding layer gets no Kronecker block"
            )
        elif not alike(sites) and alike(unbiased := [replace(s, bias=None, bias_use=None) for s in sites]):
            # one weight, a bias of each site's own (ALBERT-like sharing of a projection): a block without bias
            for bias in sorted({site.bias.name for site in sites if site.bias}):
                reasons[bias] = (f"bias of one of the {len(sites)} sites of the shared weight '{weight}', which add "
                                 "different biases: the layer keeps a block without bias")
            accepted[weight] = unbiased
        elif not alike(sites):
            uses_of = ", ".join(f"{site.kind} at {node_label(nodes[site.site.nodes[-1]])}" for site in sites)
            reasons[weight] = (f"shared: {len(sites)} layer sites that differ in kind, layout, bias or geometry "
                               f"({uses_of}); a weight gets a Kronecker block only when all its uses are alike")
        elif weight in {site.bias.name for group in by_weight.values() for site in group if site.bias}:
            reasons[weight] = "used both as a weight and as a bias"
        else:
            accepted[weight] = sites

    # A bias keeps its place in the block only when the layer explains all of its uses.
    bias_explained: dict[str, set[Use]] = defaultdict(set)
    for sites in accepted.values():
        for site in sites:
            if site.bias is not None:
                bias_explained[site.bias.name].add(site.bias_use)
    for bias, explained in bias_explained.items():
        extra = sorted(uses[bias] - explained)
        if extra:
            reasons[bias] = (
                f"bias shared: a matched layer adds it, but {_describe(extra[0], nodes)}; "
                "the layer keeps a block without bias"
            )
            for weight, sites in accepted.items():
                accepted[weight] = [
                    replace(s, bias=None, bias_use=None) if s.bias and s.bias.name == bias else s for s in sites
                ]

    covered = set(accepted) | {s.bias.name for sites in accepted.values() for s in sites if s.bias}
    orphans = _orphan_biases(by_weight, accepted)
    for name, found in uses.items():
        if name in covered or name in reasons:
            continue
        if not found:
            reasons[name] = "not used by the graph"
        elif name in orphans and found <= {use for use, _ in orphans[name]}:
            weight = orphans[name][0][1]
            reasons[name] = (
                f"bias of a layer whose weight '{weight}' gets no Kronecker block (see that weight's reason)"
            )
        else:
            reasons[name] = (f"not a linear, convolution or embedding weight: {_describe(sorted(found)[0], nodes)}"
                             f"{parametrized(name)}")
    return Verdict(accepted=accepted, reasons=reasons)


def parametrized(name: str) -> str:
    """The fix for a tensor of torch.nn.utils.parametrize (weight norm, spectral norm) or of the older
    torch.nn.utils.weight_norm (weight_g, weight_v): the layer's weight is computed from it in the forward, so the
    layer has no weight of its own to give a block; "" for other names."""
    module, found, rest = name.partition(".parametrizations.")
    if not found:
        owner, _, last = name.rpartition(".")
        if last not in ("weight_g", "weight_v"):
            return ""
        return (f"; it is weight norm's {last[-1]} of {owner or 'the model'}.weight: "
                f"torch.nn.utils.remove_weight_norm(model{f'.get_submodule({owner!r})' if owner else ''}) before "
                "compiling makes that a layer's weight, with a Kronecker block")
    attribute = rest.partition(".")[0]
    return (f"; it parametrizes {module}.{attribute} (weight norm, spectral norm): "
            f"torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule({module!r}), {attribute!r}) "
            "before compiling makes that a layer's weight, with a Kronecker block")


def _orphan_biases(
    by_weight: dict[str, list[LayerMatch]], accepted: dict[str, list[LayerMatch]]
) -> dict[str, list[tuple[Use, str]]]:
    """Biases of the layer sites that were turned down, with (their use, the site's weight).

    A tied output projection's bias is read by an Add that no other pattern explains; its reason
    should point at the weight that lost the block, not call the Add the culprit.
    """
    orphans: dict[str, list[tuple[Use, str]]] = defaultdict(list)
    for weight, sites in by_weight.items():
        if weight in accepted:
            continue
        for site in sites:
            if site.bias is not None and site.bias_use is not None:
                orphans[site.bias.name].append((site.bias_use, weight))
    return orphans
