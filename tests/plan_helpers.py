"""Helpers shared by the matching tests: a layer as one comparable tuple, and the unmatched reasons."""

from __future__ import annotations

import math

from torch import nn

from kronograph import CompiledModel, ConvGeometry, Layer, Site


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


def linear_layer(
    name: str, weight: str, bias: str | None, shape: tuple[int, int], layout: str = "out_in", sites: int = 1
) -> Layer:
    """A hand-made linear Layer record (the runtime tests build plans without compiling)."""
    out, inp = shape if layout == "out_in" else shape[::-1]
    return Layer(name, "linear", weight, bias, shape, layout, inp, out, tuple(Site("a", "s", ()) for _ in range(sites)))


def conv_layer(name: str, conv: nn.Module) -> Layer:
    """A hand-made Layer record for ``conv``, transposed or not (geometry without stride or padding: the call's own
    is used)."""
    shape = tuple(conv.weight.shape)
    rank = len(shape) - 2
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    geometry = ConvGeometry(tuple(shape[2:]), (1,) * rank, (0,) * 2 * rank, (1,) * rank, conv.groups,
                            input_dilation=(1,) * rank if transposed else ())
    in_g, out_g = (shape[0] // conv.groups, shape[1]) if transposed else (shape[1], shape[0] // conv.groups)
    return Layer(
        name, f"conv{rank}d", f"{name}.weight", f"{name}.bias" if conv.bias is not None else None, shape,
        "transposed" if transposed else "out_in", in_g * math.prod(shape[2:]), out_g, (Site("a", "s", ()),),
        geometry,
    )
