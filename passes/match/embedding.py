"""Embedding tables: Gather(table, indices) on a 2-D parameter, the indices a data input of the graph.

An embedding is a linear layer whose input is the one-hot vector of the index: s = W^T e_k with W the [rows,
dim] table, so its block has A = E[e_k e_k^T] (diagonal: how often each row is read) and G as for any linear
layer, in the table's own [in, out] layout. The runtime gives its statistics one-hot rows
(``capture.layer_input``). A is kept dense for tables of up to ``MAX_EMBEDDING_ROWS`` rows (character and
categorical vocabularies): layers of the plan. A wider table (a word vocabulary) is a ``table`` of the plan
(``match_table``), with A kept as its diagonal (``Layer.diagonal_a``), which K-FAC's torch engine covers; it is
unmatched for everything else. Indices computed inside the graph (position ids from a buffer, expanded over the
batch) are not per-example rows and stay unmatched.
"""

from __future__ import annotations

import onnx_ir as ir

from kronograph.passes.graph import int_attr, trace_parameter
from kronograph.passes.match.base import LayerMatch, MatchContext, source_location
from kronograph.passes.plan import MAX_DENSE_EMBEDDING_ROWS, Site

#: Largest table that is a layer of the plan: its dense A (rows x rows) is inverted with the other factors.
MAX_EMBEDDING_ROWS = MAX_DENSE_EMBEDDING_ROWS
_INDEX_STEPS = frozenset({"Identity", "Cast"})


def _data_indices(value: ir.Value | None) -> bool:
    """Whether ``value`` is a graph input (per-example indices), seen through Identity and Cast."""
    while value is not None:
        producer = value.producer()
        if producer is None:
            return not value.is_initializer() and value.const_value is None
        if producer.op_type not in _INDEX_STEPS or producer.domain not in ("", "ai.onnx"):
            return False
        value = producer.inputs[0]
    return False


def match_gather(node: ir.Node, ctx: MatchContext) -> LayerMatch | None:
    """Gather along axis 0 of a [rows, dim] parameter (rows <= MAX_EMBEDDING_ROWS) at the graph's own indices."""
    match = _embedding(node, ctx)
    return match if match is not None and match.in_features <= MAX_EMBEDDING_ROWS else None


def match_table(node: ir.Node, ctx: MatchContext) -> LayerMatch | None:
    """``match_gather`` of a table wider than MAX_EMBEDDING_ROWS rows (a ``table`` of the plan)."""
    match = _embedding(node, ctx)
    return match if match is not None and match.in_features > MAX_EMBEDDING_ROWS else None


def _embedding(node: ir.Node, ctx: MatchContext) -> LayerMatch | None:
    """Gather along axis 0 of a [rows, dim] parameter at the graph's own indices, of any number of rows."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or int_attr(node, "axis", 0) != 0:
        return None
    traced = trace_parameter(node.inputs[0], ctx.parameters)
    if traced is None or traced.transposed or not _data_indices(node.inputs[1]):
        return None
    shape = ctx.shapes[traced.name]
    if len(shape) != 2:
        return None
    module, call = source_location(node)
    site = Site(activation=node.inputs[1].name, preactivation=node.outputs[0].name, nodes=(*traced.nodes, node.name),
                module=module, call=call)
    return LayerMatch(kind="embedding", weight=traced, bias=None, weight_layout="in_out", weight_shape=shape,
                      in_features=shape[0], out_features=shape[1], site=site, weight_use=(node.name, 0), bias_use=None)
