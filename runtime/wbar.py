"""W_bar = [W b] per group, gathered from a layer's weight and bias and scattered back to their shapes.

The Kronecker block of a layer acts on W_bar in [out, in] order whatever the stored layout: group k
holds rows k*out_g..(k+1)*out_g of ``weight.reshape(out, -1)`` (conv: the group's output channels,
whose columns are already the group's input channels in F.unfold order), then the bias column.
A weight stored [in, out] (``weight_layout="in_out"``, GPT-2's Conv1D) is transposed on the way in
and back on the way out. A transposed convolution's weight [in, out_g, *kernel] (``"transposed"``) is the
convolution it equals (patches.dilated_input) with each group's two channel axes swapped and the kernel flipped.
``gather`` and ``scatter`` are inverse to each other.

vec convention (the paper's): vec stacks columns, vec(X) = X.T.reshape(-1), so that
(A kron G) vec(X) = vec(G X A^T) and the Fisher block of W_bar is E[a_bar a_bar^T] kron E[g g^T].
Over groups, vectors are the concatenation of the groups' vecs (the dense block is block-diagonal).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kronograph.passes.plan import Layer


def gather(layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W_bar [groups, out_g, a_dim] from tensors shaped like the layer's weight and bias."""
    if tuple(weight.shape) != tuple(layer.weight_shape):
        raise ValueError(f"layer {layer.name!r}: weight of shape {tuple(weight.shape)}, expected {layer.weight_shape}")
    if layer.weight_layout == "in_out":
        weight = weight.transpose(0, 1)
    elif layer.weight_layout == "transposed":
        weight = _convolution_weight(layer, weight)
    w = weight.reshape(layer.groups, layer.out_features, layer.in_features)
    if layer.bias is None:
        return w
    if bias is None:
        bias = w.new_zeros(layer.groups * layer.out_features)
    return torch.cat([w, bias.reshape(layer.groups, layer.out_features, 1).to(w.dtype)], dim=2)


def _convolution_weight(layer: Layer, weight: torch.Tensor) -> torch.Tensor:
    """A transposed convolution's weight [in, out_g, *kernel] as the equal convolution's [out, in_g, *kernel]."""
    in_channels, out_g, *kernel = layer.weight_shape
    spatial = tuple(range(3, 3 + len(kernel)))
    w = weight.reshape(layer.groups, in_channels // layer.groups, out_g, *kernel).transpose(1, 2).flip(spatial)
    return w.reshape(layer.groups * out_g, in_channels // layer.groups, *kernel)


def _transposed_weight(layer: Layer, w: torch.Tensor) -> torch.Tensor:
    """``_convolution_weight``'s inverse: [out, in_g * prod(kernel)] back to [in, out_g, *kernel]."""
    in_channels, out_g, *kernel = layer.weight_shape
    spatial = tuple(range(3, 3 + len(kernel)))
    w = w.reshape(layer.groups, out_g, in_channels // layer.groups, *kernel).flip(spatial).transpose(1, 2)
    return w.reshape(layer.weight_shape).contiguous()


def scatter(layer: Layer, w_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) shaped as the layer's parameters from W_bar [groups, out_g, a_dim]."""
    expected = (layer.groups, layer.out_features, layer.a_dim)
    if tuple(w_bar.shape) != expected:
        raise ValueError(f"layer {layer.name!r}: W_bar of shape {tuple(w_bar.shape)}, expected {expected}")
    w = w_bar[..., : layer.in_features].reshape(layer.groups * layer.out_features, layer.in_features)
    if layer.weight_layout == "in_out":
        weight = w.transpose(0, 1).contiguous()
    elif layer.weight_layout == "transposed":
        weight = _transposed_weight(layer, w)
    else:
        weight = w.reshape(layer.weight_shape)
    bias = w_bar[..., -1].reshape(-1) if layer.bias is not None else None
    return weight, bias


def gather_grad(layer: Layer, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor:
    """grad W_bar from the parameters' ``.grad`` (a missing .grad counts as zeros)."""
    weight = params[layer.weight]
    grad_w = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    grad_b = None
    if layer.bias is not None:
        bias = params[layer.bias]
        grad_b = bias.grad if bias.grad is not None else torch.zeros_like(bias)
    return gather(layer, grad_w, grad_b)


def scatter_to(
    layer: Layer, w_bar: torch.Tensor, params: Mapping[str, torch.nn.Parameter], attribute: str = "grad"
) -> None:
    """Write a W_bar-shaped tensor into the parameters' ``.grad`` (or, with attribute="data", values)."""
    weight, bias = scatter(layer, w_bar)
    for name, value in ((layer.weight, weight), (layer.bias, bias)):
        if name is None:
            continue
        param = params[name]
        value = value.to(param.dtype)
        if attribute == "grad":
            if param.grad is None:
                param.grad = value.clone()
            else:
                param.grad.copy_(value)
        elif attribute == "data":
            with torch.no_grad():
                param.copy_(value)
        else:
            raise ValueError(f"attribute must be 'grad' or 'data', got {attribute!r}")


def vec(w_bar: torch.Tensor) -> torch.Tensor:
    """Column-stacking vec of W_bar [groups, out_g, a_dim], groups concatenated: [groups * out_g * a_dim]."""
    return w_bar.transpose(1, 2).reshape(-1)


def unvec(vector: torch.Tensor, groups: int, out_features: int, a_dim: int) -> torch.Tensor:
    """The inverse of ``vec``."""
    return vector.reshape(groups, a_dim, out_features).transpose(1, 2)
