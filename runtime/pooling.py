"""Max pooling by separable strided maxima in K-FAC's no-grad forwards on the CPU.

PyTorch's CPU kernel for max pooling of contiguous (NCHW) activations is 5-20x slower than taking the
maximum of the window's strided slices one spatial axis at a time (a 2x2 pool of 64 x 32 x 28 x 28: 3.4 ms
against 0.2 ms on 2 cores; BENCHMARKS.md), and K-FAC runs 3-5 forwards without gradients a step (the
quadratic model's differences, the forward for rho). The maximum is exact, so the substitution gives the
same outputs bit for bit; it is made only where no gradient is formed (a tie's gradient would go elsewhere),
only on the CPU (cuDNN's kernel is fast), and only for what the slices express exactly (no ``ceil_mode``,
no indices); every other call goes to PyTorch's kernel unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from kronograph.runtime.patches import per_axis

_RANKS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
          torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3}
_ARGUMENTS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def separable_max_pool(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                       padding: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """max_poolNd of ``x`` over its last len(kernel) axes (floor mode): each axis reduced in turn by the maximum
    of its kernel's strided slices, the padding filled with -inf as PyTorch's kernel pads."""
    rank = len(kernel)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)], value=float("-inf"))
    for axis, (k, s, d) in enumerate(zip(kernel, stride, dilation), start=x.dim() - rank):
        size = (x.shape[axis] - d * (k - 1) - 1) // s + 1
        index = [slice(None)] * x.dim()
        reduced = None
        for offset in range(k):
            index[axis] = slice(offset * d, offset * d + s * (size - 1) + 1, s)
            part = x[tuple(index)]
            reduced = part if reduced is None else torch.maximum(reduced, part)
        x = reduced
    return x


def _substitute(rank: int, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The separable pool for this call, or None where PyTorch's kernel should run it."""
    bound = dict(zip(_ARGUMENTS, args), **kwargs)
    x = bound.get("input")
    if (not isinstance(x, torch.Tensor) or x.device.type != "cpu" or not x.is_floating_point()
            or x.dim() not in (rank + 1, rank + 2) or not x.is_contiguous()
            or torch.is_grad_enabled() and x.requires_grad
            or bound.get("ceil_mode") or bound.get("return_indices")):
        return None
    kernel = per_axis(bound["kernel_size"], rank)
    stride = bound.get("stride")
    stride = kernel if stride is None or isinstance(stride, (list, tuple)) and not stride else per_axis(stride, rank)
    padding = per_axis(bound.get("padding", 0), rank)
    dilation = per_axis(bound.get("dilation", 1), rank)
    if any(len(values) != rank for values in (kernel, stride, padding, dilation)):
        return None  # (PyTorch's error)
    sizes = x.shape[-rank:]
    valid = all(k > 0 and s > 0 and d > 0 and 0 <= p <= k // 2 and n + 2 * p >= d * (k - 1) + 1
                for k, s, p, d, n in zip(kernel, stride, padding, dilation, sizes))
    return separable_max_pool(x, kernel, stride, padding, dilation) if valid else None  # (invalid: PyTorch's error)


class _SeparablePooling(TorchFunctionMode):
    """Runs max pooling calls by ``separable_max_pool`` where ``_substitute`` allows; counts those it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.substituted = 0

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        rank = _RANKS.get(func)
        if rank is not None:
            result = _substitute(rank, args, kwargs)
            if result is not None:
                self.substituted += 1
                return result
        return func(*args, **kwargs)


class FastPooling:
    """``with fast_pooling():`` around a no-grad forward. The first forward finds out whether the model has a max
    pool to substitute (on the CPU, contiguous); one that has none is never run under the mode again (a mode
    costs a Python call per torch call)."""

    def __init__(self) -> None:
        self.pools: bool | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self.pools is False:
            yield
            return
        mode = _SeparablePooling()
        with mode:
            yield
        self.pools = bool(self.pools) or mode.substituted > 0
