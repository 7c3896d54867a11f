"""A weight-normed layer's block works in the coordinates of its computed weight W = g v / |v| (passes/match/
weight_norm.py): the gradient is pushed forward to W, the block's step in W pulled back to (g, v).

Per group of W's entries one g scales (an output row for dim=0, a slice along dim k, all of W for dim=None), with
u = v / |v| over the group: dW = u dg + (g / |v|) (I - u u^T) dv. So
- grad_g = u . grad_W and grad_v = (g / |v|) (I - u u^T) grad_W give back grad_W = u grad_g + (|v| / g) grad_v;
- a step Delta W is the step dg = u . Delta W, dv = (|v| / g) (I - u u^T) Delta W (dv orthogonal to v, the one
  direction that leaves W alone), whose first-order change of W is Delta W exactly, and grad_g dg + grad_v . dv =
  grad_W . Delta W: the quadratic model, rho and the signal share see the same numbers in either coordinates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from kronograph.passes.plan import Layer


def norm_axes(v: torch.Tensor, g: torch.Tensor) -> tuple[int, ...]:
    """The axes of v weight norm's |v| runs over: those where g has size 1 (g [out, 1, ..., 1] for dim=0, v's
    shape with 1 but on axis k for dim=k), all of them for a scalar g (dim=None)."""
    if g.dim() == 0:
        return tuple(range(v.dim()))
    return tuple(axis for axis in range(v.dim()) if g.shape[axis] == 1)


def _group_frame(v: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u = v / |v|, |v| / g) per group (a slice along dim, or all of v), shaped to broadcast against v; a zero v or
    a zero g gives zeros (such a group's W is 0 or its v has no direction: nothing to push or pull there)."""
    norm = torch.linalg.vector_norm(v, dim=norm_axes(v, g), keepdim=True)
    g = g.reshape(norm.shape)
    u = torch.where(norm > 0, v / norm, torch.zeros_like(v))
    scale = torch.where(g != 0, norm / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(g))
    return u, scale


def _group_dot(u: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (u * w).sum(norm_axes(u, g), keepdim=True)


def weight_coordinates(grads: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                       layers: Iterable[Layer]) -> dict[str, torch.Tensor]:
    """``grads`` with each weight-normed layer's grad_W added under its computed weight's name (v's and g's kept)."""
    found = dict(grads)
    for layer in layers:
        if layer.weight_norm is None:
            continue
        direction, magnitude = layer.weight_norm
        if direction not in grads or magnitude not in grads:
            continue
        u, scale = _group_frame(params[direction].detach(), params[magnitude].detach())
        found[layer.weight] = u * grads[magnitude].reshape(scale.shape) + scale * grads[direction]
    return found


def parameter_coordinates(step: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                          layers: Iterable[Layer]) -> dict[str, torch.Tensor]:
    """``step`` with each weight-normed layer's Delta W replaced by its (dg, dv)."""
    found = dict(step)
    for layer in layers:
        if layer.weight_norm is None or layer.weight not in found:
            continue
        direction, magnitude = layer.weight_norm
        delta = found.pop(layer.weight)
        u, scale = _group_frame(params[direction].detach(), params[magnitude].detach())
        along = _group_dot(u, delta, params[magnitude])
        found[magnitude] = along.reshape(params[magnitude].shape)
        found[direction] = scale * (delta - u * along)
    return found
