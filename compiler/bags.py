"""EmbeddingBag tables as embedding layers of the plan, on the torch engine.

The exporter writes ``F.embedding_bag`` as a Loop over the bags with a Gather inside, which no matcher reads as a
table; yet a "sum" or "mean" bag over 2-D bags is an embedding read once a token and summed with fixed weights
(runtime/bags.py), whose block is the table's. Here each weight the example forward read only through such bags
becomes an embedding Layer, one site a call: a table of the plan (A kept as its diagonal) above
``MAX_DENSE_EMBEDDING_ROWS`` rows, a layer below. The sites have no graph tensors: the onnxruntime engine, which
reads sites from the graph, keeps these weights unmatched.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from kronograph.compiler.recurrent import by_parameter_order
from kronograph.passes.plan import MAX_DENSE_EMBEDDING_ROWS, Layer, LayerPlan, Site, Unmatched
from kronograph.runtime import bags


class BagCalls(TorchFunctionMode):
    """Counts, over a forward, each tensor's linear bag calls and its other uses (as any function's argument)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear: Counter[int] = Counter()  # id(table) -> its "sum" / "mean" bag calls
        self.other: set[int] = set()  # ids of tensors some other call (a "max" bag too) took

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        call = bags.linear_call(args, kwargs) if func is bags.FUNCTION else None
        if call is not None:
            self.linear[id(call.weight)] += 1
        elif getattr(func, "__name__", "") != "__get__":  # (reading an attribute, .shape, is no use)
            self.other.update(id(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        return func(*args, **kwargs)

    def plan_with_tables(self, module: torch.nn.Module, plan: LayerPlan) -> LayerPlan:
        """``plan`` with an embedding Layer for each unmatched 2-D parameter the forward read through linear bags
        alone: in ``tables`` (and still unmatched, with the reason, for the methods without table blocks) above
        MAX_DENSE_EMBEDDING_ROWS rows, in ``layers`` otherwise."""
        unmatched = {entry.name: entry for entry in plan.unmatched}
        found = {name: p for name, p in module.named_parameters()
                 if name in unmatched and p.dim() == 2 and self.linear[id(p)] and id(p) not in self.other}
        if not found:
            return plan
        layers, tables, reasons = [], [], {}
        for name, parameter in found.items():
            rows, width = parameter.shape
            prefix = name.rpartition(".")[0]
            site = Site(activation="", preactivation="", nodes=(), module=prefix, call="embedding_bag")
            layer = Layer(name=prefix or name, kind="embedding", weight=name, bias=None, weight_shape=(rows, width),
                          weight_layout="in_out", in_features=rows, out_features=width,
                          sites=(site,) * self.linear[id(parameter)])
            if rows > MAX_DENSE_EMBEDDING_ROWS:
                tables.append(layer)
                reasons[name] = (f"an EmbeddingBag's table of {rows} rows, more than {MAX_DENSE_EMBEDDING_ROWS}: a "
                                 "table of the plan, a block with a diagonal A in K-FAC and KFACPreconditioner "
                                 "(table_blocks) on the torch engine, outside every block elsewhere")
            else:
                layers.append(layer)
        entries = tuple(Unmatched(e.name, e.shape, reasons.get(e.name, e.reason)) for e in plan.unmatched
                        if e.name not in found or e.name in reasons)
        return dataclasses.replace(plan, layers=by_parameter_order(list(plan.layers), plan.parameters, layers),
                                   tables=(*plan.tables, *tables), unmatched=entries)
