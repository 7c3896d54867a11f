"""Helpers shared by the matching tests: a layer as one comparable tuple, and the unmatched reasons."""

from __future__ import annotations

from kronograph import CompiledModel, Layer


def summary(layer: Layer) -> tuple:
    """What a layer is, in one comparable tuple."""
    return (
        layer.name,
        layer.kind,
        layer.weight,
        layer.bias,
        layer.weight_layout,
        layer.in_features,
        layer.out_features,
        layer.a_dim,
        layer.g_dim,
        layer.groups,
        len(layer.sites),
    )


def reasons(cm: CompiledModel) -> dict[str, str]:
    """Unmatched parameter name -> its reason."""
    return {entry.name: entry.reason for entry in cm.plan.unmatched}
