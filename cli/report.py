"""Human-readable and JSON views of a LayerPlan for `kronograph inspect`."""

from __future__ import annotations

import math
from typing import Any

from kronograph.passes.plan import Layer, LayerPlan


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _factor(dim: int, groups: int) -> str:
    return f"{dim}x{dim}" if groups == 1 else f"{groups} x {dim}x{dim}"


def _row(layer: Layer) -> list[str]:
    kind = layer.kind if len(layer.sites) == 1 else f"{layer.kind} ({len(layer.sites)} sites)"
    return [
        layer.name,
        kind,
        "x".join(map(str, layer.weight_shape)) + (" +b" if layer.bias else ""),
        _factor(layer.a_dim, layer.groups),
        _factor(layer.g_dim, layer.groups),
        _size(layer.factor_bytes),
    ]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def summary(plan: LayerPlan) -> dict[str, Any]:
    matched = sum(layer.num_params for layer in plan.layers)
    unmatched = sum(math.prod(entry.shape) for entry in plan.unmatched)
    return {
        "layers": len(plan.layers),
        "unmatched": len(plan.unmatched),
        "parameters_in_blocks": matched,
        "parameters_unmatched": unmatched,
        "factor_bytes_float32": sum(layer.factor_bytes for layer in plan.layers),
    }


def format_plan(plan: LayerPlan, title: str) -> str:
    """The inspect table: the model output the loss is put on, one row per layer, totals, then the unmatched
    parameters with reasons."""
    rows = [_row(layer) for layer in plan.layers]
    totals = summary(plan)
    parts = [
        f"{title}: {totals['layers']} Kronecker-factored layers, {totals['unmatched']} unmatched parameters",
        *([f"loss on: {plan.output}"] if plan.output else []),
        "",
        _table(["layer", "kind", "weight", "A", "G", "factors (fp32)"], rows) if rows else "(no layers matched)",
        "",
        f"parameters in blocks: {totals['parameters_in_blocks']:,}   unmatched: {totals['parameters_unmatched']:,}"
        f"   factor memory: {_size(totals['factor_bytes_float32'])} (inverses as much again)",
    ]
    if plan.unmatched:
        parts += ["", "unmatched parameters (first-order update):"]
        parts += [f"  {entry.name} {list(entry.shape)}: {entry.reason}" for entry in plan.unmatched]
    return "\n".join(parts)
