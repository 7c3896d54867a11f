"""K-FAC's update without re-scaling, the heavy ball: in torch (``heavy_ball``), and on the fused kernel
(``triton_kernels.update.fused_update``) where it is exact (``fused_layers``, ``fused_heavy_ball_``).

Why: ``KFAC(rescale=False)`` applies delta = lr Delta + momentum previous with Delta = -G^-1 V A^-1 (V = grad h,
weight decay included), then theta += delta and previous <- delta. In torch that is the two matmuls, then the
negation, the scaling, the momentum sum, the finiteness check and the add, each a pass over the layer. The
kernel does all of it in the second matmul's epilogue: previous and the weight are read once and written once.
Its semantics match exactly (scale = -lr, kernel lr = 1, weight_decay = 0 since eta W is already in V) only for
a layer whose W_bar is its weight itself: no bias column, the weight a view [groups, out, in] of the parameter,
the block-diagonal structure, no low-rank product this step, float32 throughout, on the torch engine (whose
parameters are the module's own tensors), and only where the dispatch picks Triton (CUDA, or
``forced_backend("triton")`` under the interpreter). Every other layer takes the torch path unchanged.

The torch path checks the update is finite before writing; the kernel writes as it computes. So before it
runs, a bound from the operands' norms (one host read for all layers: |T| <= |V|_F |A^-1|_F, |delta| <= lr
|G^-1|_F |V|_F |A^-1|_F + momentum max|previous|) proves delta finite; a layer it cannot prove takes the torch
formulas here, and one whose update is not finite is left as it is (warned, its momentum reset), so a NaN or
Inf still never reaches the weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping

import torch

from kronograph.passes.plan import Layer
from kronograph.runtime.curvature import BlockDiagonalCurvature
from kronograph.runtime.inverse import SkippedStepWarning, all_finite
from kronograph.runtime.wbar import gather
from kronograph.triton_kernels.dispatch import use_triton

_LIMIT = torch.finfo(torch.float32).max / 1024  # margin for float32 rounding of the bounded sums


def heavy_ball(step: Mapping[str, torch.Tensor], lr: float, momentum: float,
               previous: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The update without re-scaling in torch: lr * step, plus momentum times the previous update."""
    if momentum and previous is not None:
        return {name: d * lr + momentum * previous[name] for name, d in step.items()}
    return {name: d * lr for name, d in step.items()}


def _w_bar_view(layer: Layer, tensor: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` (shaped as the layer's weight) as W_bar [groups, out, in] sharing its memory, or None."""
    if layer.weight_layout == "in_out":
        tensor = tensor.transpose(0, 1)
    elif layer.weight_layout == "transposed":  # swapped channel axes and a flipped kernel: no view
        return None
    try:
        return tensor.view(layer.groups, layer.out_features, layer.in_features)
    except RuntimeError:  # a layout reshape would copy
        return None


def fused_layers(engine, curvature, grads: Mapping[str, torch.Tensor], rows: Collection[str],
                 left_out: Collection[str]) -> tuple[list[Layer], BlockDiagonalCurvature]:
    """The layers whose heavy-ball update ``fused_heavy_ball_`` will make this step, and the curvature of the
    others (a shallow copy holding only their blocks), whose ``direction`` gives the others' proposal."""
    if engine.name != "torch" or type(curvature) is not BlockDiagonalCurvature:
        return [], curvature
    params = engine.parameters()
    chosen = [
        block.layer for name, block in curvature.blocks.items()
        if block.layer.bias is None and block.by_rows and name not in rows
        and block.layer.weight not in left_out and block.estimated
        and block.dtype == torch.float32 and params[block.layer.weight].dtype == torch.float32
        and grads[block.layer.weight].dtype == torch.float32
        and _w_bar_view(block.layer, params[block.layer.weight]) is not None
        and use_triton("auto", params[block.layer.weight], "update")
    ]
    if not chosen:
        return [], curvature
    taken = {layer.name for layer in chosen}
    return chosen, curvature.restricted([name for name in curvature.blocks if name not in taken])


def fused_heavy_ball_(engine, curvature, layers: list[Layer], grads: Mapping[str, torch.Tensor], inverses: Mapping,
                      previous: Mapping[str, torch.Tensor] | None, lr: float, momentum: float,
                      rows: Mapping) -> dict[str, torch.Tensor]:
    """theta += delta = lr (-F^-1 grad) + momentum previous for ``layers`` (from ``fused_layers``), in place;
    returns {weight name: delta} shaped as the weights (``previous``'s buffers overwritten), for KFAC.previous."""
    from kronograph.triton_kernels import update as kernels  # imports triton: only here

    params = engine.parameters()
    lasts = {layer.weight: previous.get(layer.weight) if momentum and previous is not None else None
             for layer in layers}
    bounded = [layer for layer in layers if inverses[layer.name] is not None]
    if bounded:  # one host read: the norms behind every layer's bound (inf where a norm overflows: not fused)
        norms = torch.stack([torch.stack([
            torch.linalg.vector_norm(grads[layer.weight]).float(),
            torch.linalg.vector_norm(inverses[layer.name].a_inv).float(),
            torch.linalg.vector_norm(inverses[layer.name].g_inv).float(),
            lasts[layer.weight].abs().max().float() if lasts[layer.weight] is not None
            else grads[layer.weight].new_zeros((), dtype=torch.float32),
        ]) for layer in bounded]).tolist()
    fallback = [layer for layer in layers if inverses[layer.name] is None]
    deltas: dict[str, torch.Tensor] = {}
    for layer, (v_norm, a_norm, g_norm, last_max) in zip(bounded, norms if bounded else []):
        if not max(v_norm * a_norm, abs(lr) * g_norm * v_norm * a_norm + abs(momentum) * last_max) < _LIMIT:
            fallback.append(layer)  # not provably finite (NaN-safe comparison)
            continue
        param, last = params[layer.weight], lasts[layer.weight]
        if last is None:
            buffer = torch.empty_like(param, memory_format=torch.contiguous_format)
        else:
            buffer = last if _w_bar_view(layer, last) is not None else last.contiguous()
        kernels.fused_update(inverses[layer.name].g_inv, gather(layer, grads[layer.weight]), inverses[layer.name].a_inv,
                             scale=-lr, previous=_w_bar_view(layer, buffer), momentum=0.0 if last is None else momentum,
                             param=_w_bar_view(layer, param), weight_decay=0.0, lr=1.0, backend="triton")
        deltas[layer.weight] = buffer
    if fallback:  # the torch path's own formulas (curvature.direction, heavy_ball), checked before written
        subset = curvature.restricted([layer.name for layer in fallback])
        for name, update in heavy_ball(subset.direction(grads, inverses, rows), lr, momentum, previous).items():
            if all_finite([update]):
                engine.add_({name: update})
                deltas[name] = update
            else:
                warnings.warn(f"K-FAC: the update of {name} is not finite; it was left unchanged and its momentum "
                              "reset", SkippedStepWarning, stacklevel=3)
                deltas[name] = torch.zeros_like(params[name])
    return deltas
