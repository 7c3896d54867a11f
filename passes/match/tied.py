"""Tied tables: one [rows, dim] weight read as an embedding table and as an output layer's weight (GPT-2's head).

Coverage (verification.py) turns such a weight down: its sites differ in kind. Yet each use is a Kronecker
layer of its own, the table a linear map on one-hot rows (A_e = E[e_k e_k^T], G_e over dim) and the head
F.linear(h, W) (A_h over dim, G_h over rows), so the weight's Fisher block is, as for any weight shared by two
layers (KFAC-expand), the sum of the two uses' Kronecker products: G_h (x) A_h + A_e (x) G_e in the table's
[rows, dim] coordinates. runtime/tied.py inverts that sum exactly. A pair is a tie when every use of the weight
is one of its sites, the table's sites alike and the head's alike (the head reading the weight as [out, in]);
the head's bias comes along where the head's sites explain all of its uses.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace

from kronograph.passes.match.base import LayerMatch, Use
from kronograph.passes.match.verification import alike


def find_ties(matches: Iterable[LayerMatch], uses: dict[str, set[Use]], turned_down: Iterable[str]
              ) -> dict[str, tuple[list[LayerMatch], list[LayerMatch]]]:
    """By weight, the (table sites, head sites) of each weight in ``turned_down`` whose uses are exactly the
    sites of one embedding and one output layer; the head's bias dropped from its sites where something else
    reads it too."""
    by_weight: dict[str, list[LayerMatch]] = defaultdict(list)
    for match in matches:
        by_weight[match.weight.name].append(match)
    ties = {}
    for weight in turned_down:
        sites = by_weight.get(weight, [])
        table = [site for site in sites if site.kind == "embedding"]
        head = [site for site in sites if site.kind == "linear"]
        if not table or not head or len(table) + len(head) != len(sites):
            continue
        if uses[weight] != {site.weight_use for site in sites} or not alike(table) or not alike(head):
            continue
        rows, dim = table[0].weight_shape
        if head[0].weight_layout != "out_in" or (head[0].out_features, head[0].in_features) != (rows, dim):
            continue
        bias = head[0].bias
        if bias is not None and uses.get(bias.name) != {site.bias_use for site in head}:
            head = [replace(site, bias=None, bias_use=None) for site in head]
        ties[weight] = (table, head)
    return ties
