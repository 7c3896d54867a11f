"""Recurrent layers (nn.GRU, nn.LSTM, nn.RNN) as Kronecker blocks of the plan, on the torch engine.

The exporter turns a recurrent layer into sliced weights feeding a GRU / LSTM / RNN node (or a loop), which no
matcher reads as a linear layer; yet each layer-direction applies two linear maps, W_ih to the input and W_hh
to the previous hidden state, at every time step. The torch engine's capture rebuilds the fused function step
by step and records both (runtime/recurrent.py), so here each weight the example forward passed to a fused
recurrent call becomes a linear Layer (its bias b_ih / b_hh with it; an LSTM's projection W_hr, bias-free, too),
one site a call. The sites have no graph tensors: the onnxruntime engine, which reads sites from the graph, keeps
these weights unmatched.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from kronograph.passes.plan import Layer, LayerPlan, Site, Unmatched
from kronograph.runtime import recurrent


class RecurrentCalls(TorchFunctionMode):
    """Counts, over a forward, the fused recurrent calls each parameter takes part in, and why a call is not
    rebuilt where it is not."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[recurrent.RecurrentCall] = []
        self.refused: dict[int, str] = {}  # id(weight) -> why its call is not rebuilt
        self.packed = False  # whether a call ran on a packed sequence (which torch.export cannot trace)

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in recurrent.FUNCTIONS:
            call = recurrent.examine(func, args, kwargs)
            if isinstance(call, recurrent.RecurrentCall):
                self.calls.append(call)
            else:
                self.packed = self.packed or call == recurrent.PACKED
                lists = [a for a in args if isinstance(a, (list, tuple))]  # the weights come after an LSTM's hx
                self.refused.update({id(w): call for w in (lists[-1] if lists else ()) if isinstance(w, torch.Tensor)})
        return func(*args, **kwargs)

    def plan_with_layers(self, module: torch.nn.Module, plan: LayerPlan) -> LayerPlan:
        """``plan`` with a linear Layer for each input and hidden map of the counted calls, placed by parameter
        order. A map's weight and bias must be trainable and outside other layers; a layer the graph matcher made
        of one (an nn.RNN exports as an unrolled loop of MatMuls, T sites for W_hh) is replaced, its sites being
        the graph's and not the capture's. Refused calls' weights get the reason."""
        names = {id(p): name for name, p in module.named_parameters()}
        sites: Counter[tuple] = Counter()
        for call in self.calls:
            for k in range(call.num_layers * call.directions):
                w_ih, w_hh, b_ih, b_hh = call.weights(k)
                maps = ((w_ih, b_ih), (w_hh, b_hh)) + (((call.projection(k), None),) if call.projected else ())
                for weight, bias in maps:
                    sites[(names.get(id(weight)), names.get(id(bias)) if bias is not None else None, call.mode)] += 1
        refused = {names[i]: why for i, why in self.refused.items() if i in names}
        candidates = {weight for weight, _, _ in sites if weight is not None and weight not in refused}
        shapes = {entry.name: entry.shape for entry in plan.unmatched}
        shapes.update({layer.weight: layer.weight_shape for layer in plan.layers if layer.weight in candidates})
        free = set(shapes) | {layer.bias for layer in plan.layers if layer.weight in candidates and layer.bias}
        maps = {weight: (bias, mode, count) for (weight, bias, mode), count in sites.items()
                if weight in candidates and weight in free and (bias is None or bias in free)}
        added = []
        for weight, (bias, mode, count) in maps.items():
            shape = shapes[weight]
            prefix, _, last = weight.rpartition(".")
            site = Site(activation="", preactivation="", nodes=(), module=prefix, call=mode)
            added.append(Layer(
                name=f"{prefix}.{last.removeprefix('weight_')}" if prefix else last.removeprefix("weight_"),
                kind="linear", weight=weight, bias=bias, weight_shape=shape, weight_layout="out_in",
                in_features=shape[1], out_features=shape[0], sites=(site,) * count,
            ))
        covered = {name for layer in added for name in (layer.weight, layer.bias) if name}
        kept = [layer for layer in plan.layers if layer.weight not in maps]
        entries = tuple(
            Unmatched(e.name, e.shape, f"a recurrent layer's weight in {refused[e.name]}: the fused call runs as it is")
            if e.name in refused else e
            for e in plan.unmatched if e.name not in covered
        )
        return dataclasses.replace(plan, layers=by_parameter_order(kept, plan.parameters, added), unmatched=entries)


def by_parameter_order(layers: list[Layer], parameters: tuple[str, ...], added: list[Layer]) -> tuple[Layer, ...]:
    """``layers`` in their order with each added layer before the first whose weight comes later in the model's
    ``parameters`` (the block-tridiagonal inverse chains layers in plan order)."""
    position = {name: i for i, name in enumerate(parameters)}
    layers = list(layers)
    for layer in sorted(added, key=lambda found: position.get(found.weight, len(position))):
        at = next((i for i, other in enumerate(layers)
                   if position.get(other.weight, len(position)) > position.get(layer.weight, len(position))),
                  len(layers))
        layers.insert(at, layer)
    return tuple(layers)
