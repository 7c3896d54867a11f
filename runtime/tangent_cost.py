"""Which functions make forward-mode tangents dear, for ``fisher_products="auto"`` (runtime/engines/torch.py).

- Fused attention (``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``): forward mode must run
  attention on its math kernel, 1.6x dearer on the first-try suite's transformer.
- Batch norm in training mode (``F.batch_norm`` with batch statistics): its tangent differentiates the batch's
  mean and variance, a dozen elementwise passes over the activations for every direction: three directions cost
  262 ms against a 20 ms forward on the first-try ResNet (central differences: 130 ms). In evaluation mode batch
  norm is an affine map, cheap in forward mode. Group and instance norm normalise by each example's own
  statistics in both modes, with the same dear tangent: three directions cost 72 ms against 49 ms by central
  differences on a two-conv GroupNorm net (batch 64; an 8 ms forward).
- Recurrent layers (``nn.GRU``, ``nn.LSTM``, ``nn.RNN``: ``torch.gru``, ``torch.lstm``, ``torch.rnn_tanh``,
  ``torch.rnn_relu``): forward mode leaves their fused CPU kernels for a step-by-step graph, the tangent of each
  time step a pass of its own: on a one-layer GRU language model (64 characters, batch 32) the quadratic model's
  three directions cost 65 ms by forward mode against 36 ms by central differences. The cells (``nn.GRUCell``,
  ``torch.gru_cell`` and the others) stepped in the model's own loop likewise: a GRUCell character model (32 steps,
  batch 32) 26 ms by forward mode against 14 ms by differences.
- Convolutions (``F.conv1d`` to ``conv3d`` and the transposed ones): a direction's tangent is two convolutions (the
  input's tangent through the weight, the input through the weight's tangent) batched over the directions by
  functorch, against one convolution a direction for a difference: a step of the first try's depthwise CNN 70 ->
  39 ms, of its character CNN 22 -> 18, of its Fashion-MNIST CNN 77 -> 67, at the same loss over 300-600 steps
  (BENCHMARKS.md).

Some operations have no forward-mode derivative in PyTorch at all (``torch._weight_norm`` of the weight-norm
parametrisation, the power iteration of spectral norm, ``embedding_bag``, a custom ``autograd.Function`` without
``setup_context``, a vmap rule or a ``jvp``): forward mode raises there, and "auto" takes central differences
instead (``lacks_forward_mode``).

Plain forwards keep them cheap, so differences win where a model calls one: one-sided ones (one forward a
direction beside the outputs at theta), but central ones (two a direction) where batch norm normalises by the
batch's statistics: one-sided steps of a batch-norm ResNet at batch 8 ended at 1.08-2.61 where central ones ended
at 0.91-1.13 (four seeds, 200 steps; BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from kronograph.runtime.recurrent import CELLS as RECURRENT_CELLS, FUNCTIONS as RECURRENT_FUNCTIONS

FUSED_ATTENTION = frozenset({F.multi_head_attention_forward, F.scaled_dot_product_attention})
BATCH_NORM = frozenset({F.batch_norm, torch.batch_norm})
GROUP_NORM = frozenset({F.group_norm, torch.group_norm, F.instance_norm, torch.instance_norm})
RECURRENT = frozenset(RECURRENT_FUNCTIONS) | frozenset(RECURRENT_CELLS)
# (F.conv2d and the others are torch.conv2d's own objects: one entry each)
CONVOLUTION = frozenset({F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d})
_TRAINING = 5  # ``training``'s position in both F.batch_norm and torch.batch_norm
BATCH_NORM_TRAINING = "batch norm in training mode"  # the one dear kind that keeps central differences


def _batch_statistics(args: tuple, kwargs: dict) -> bool:
    """Whether a batch_norm call normalises with the batch's own statistics (training mode)."""
    training = kwargs["training"] if "training" in kwargs else args[_TRAINING] if len(args) > _TRAINING else False
    return bool(training)


class _Spy(TorchFunctionMode):
    """Notes, in the order first called, the functions that make forward-mode tangents dear."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        reason = None
        if func in FUSED_ATTENTION:
            reason = "attention"
        elif func in BATCH_NORM and _batch_statistics(args, kwargs):
            reason = BATCH_NORM_TRAINING
        elif func in GROUP_NORM:
            reason = "group or instance norm"
        elif func in RECURRENT:
            reason = "a recurrent layer"
        elif func in CONVOLUTION:
            reason = "a convolution"
        if reason is not None and reason not in self.seen:
            self.seen.append(reason)
        return func(*args, **kwargs)


def dear_for_forward_mode(forward: Callable[[], Any]) -> list[str]:
    """What ``forward()`` calls that makes forward-mode tangents dear ("attention", "batch norm in training
    mode", "group or instance norm", "a recurrent layer", "a convolution"), in the order first called; empty where
    nothing does (nn.MultiheadAttention, the Transformer layers, Hugging Face's sdpa attention, nn.BatchNorm in
    training mode, nn.GroupNorm, nn.InstanceNorm, nn.GRU, nn.LSTM and nn.RNN and their cells, nn.Conv1d to Conv3d
    and the transposed ones are seen)."""
    with _Spy() as spy:
        forward()
    return spy.seen


#: What PyTorch says where forward mode (or its vmap over the directions) cannot run: an operation without a
#: forward-mode derivative, a custom autograd.Function without setup_context, a vmap rule or a jvp, or a derivative
#: whose tangent comes out misshapen (torch 2.13's for weight norm over all of v, dim=None: [1, 1] for a scalar g).
_NO_FORWARD_MODE = ("Trying to use forward AD", "functorch transforms", "does not have vmap support",
                    "use it with forward mode AD", "Trying to set a forward gradient that has a different size")


def lacks_forward_mode(error: Exception) -> bool:
    """Whether ``error`` is PyTorch's refusal of forward-mode differentiation for something the model calls
    ("Trying to use forward AD with _weight_norm_interface that does not support it ...", or a custom
    autograd.Function's)."""
    return isinstance(error, (NotImplementedError, RuntimeError)) and any(text in str(error)
                                                                          for text in _NO_FORWARD_MODE)


def products_for(dear: list[str]) -> str:
    """The quadratic model's products for a model whose forward calls ``dear`` (``dear_for_forward_mode``):
    forward mode where nothing is dear, central differences with batch norm in training mode, one-sided ones
    elsewhere."""
    if not dear:
        return "forward"
    return "differences" if BATCH_NORM_TRAINING in dear else "one-sided"
