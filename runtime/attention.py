"""Multi-head attention from recorded projections: ``F.multi_head_attention_forward`` rebuilt from torch's
own pieces, with every projection made by a callback, so that a TorchFunctionMode (runtime/capture.py)
can record the F.linear calls torch's function would make out of its sight.

The arithmetic follows torch's function step for step (masks canonicalised by torch's helpers, the
packed in-projection split the same way, F.scaled_dot_product_attention when the weights are not
needed, the explicit softmax otherwise, the same dropout calls in the same order), with one change of
layout: each projection runs on its input batch-major, [n, T, E] instead of attention's sequence-first
[T, n, E], so that the recorded a and g have the examples along dim 0 as the statistics expect
(runtime/factors.py) whatever T is. Row for row the products are the same.

Supported: batched 3-D inputs, self- and cross-attention, packed or separate q/k/v weights, biases,
key_padding_mask, attn_mask, is_causal, need_weights with average_attn_weights, dropout. ``bind``
returns None (the caller runs torch's function) for bias_k/bias_v, add_zero_attn, static_k/static_v
and unbatched inputs.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

MULTI_HEAD_ATTENTION = F.multi_head_attention_forward
_SIGNATURE = inspect.signature(MULTI_HEAD_ATTENTION)
_HELPERS = ("_canonical_mask", "_none_or_dtype", "_mha_shape_check", "_check_key_padding_mask")

Project = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def bind(args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by name (defaults filled in), or None when it is a case handled only by torch."""
    if not all(hasattr(F, helper) for helper in _HELPERS):
        return None
    try:
        call = _SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return None
    call.apply_defaults()
    c = call.arguments
    unsupported = (
        c["bias_k"] is not None or c["bias_v"] is not None or c["add_zero_attn"]
        or c["static_k"] is not None or c["static_v"] is not None
        or not isinstance(c["query"], torch.Tensor) or c["query"].dim() != 3
        or not isinstance(c["embed_dim_to_check"], int)
    )
    return None if unsupported else dict(c)


def sliced_weight(call: dict[str, Any]) -> torch.Tensor | None:
    """The packed in_proj_weight when the call projects with slices of it (cross-attention), else None: a
    slice is not the weight, so its sites cannot be recorded as the weight's."""
    if call["use_separate_proj_weight"]:
        return None
    query, key, value = call["query"], call["key"], call["value"]
    return None if (query is key and key is value) else call["in_proj_weight"]


def _batch_major(project: Project, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """project(x, W, b) for a sequence-first x [T, n, E], run on x batch-major; the result sequence-first."""
    return project(x.transpose(0, 1), weight, bias).transpose(0, 1)


def _split(projection: torch.Tensor, parts: int, embed_dim: int) -> torch.Tensor:
    """[T, n, parts * E] -> [parts, T, n, E] contiguous, as torch's _in_projection_packed does."""
    return projection.unflatten(-1, (parts, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()


def _in_projection(call: dict[str, Any], project: Project) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    query, key, value = call["query"], call["key"], call["value"]
    embed_dim, bias = query.shape[-1], call["in_proj_bias"]
    if call["use_separate_proj_weight"]:
        weights = (call["q_proj_weight"], call["k_proj_weight"], call["v_proj_weight"])
        if any(w is None for w in weights):
            raise AssertionError("use_separate_proj_weight is True but a q/k/v projection weight is None")
        for w, x, name in zip(weights, (query, key, value), ("query", "key", "value")):
            if w.shape != (embed_dim, x.shape[-1]):
                raise AssertionError(f"expecting {name} weights shape of {(embed_dim, x.shape[-1])}, but got {w.shape}")
        biases = (None,) * 3 if bias is None else bias.chunk(3)
        inputs = (query, key, value)
        return tuple(_batch_major(project, x, w, b).contiguous() for x, w, b in zip(inputs, weights, biases))
    weight = call["in_proj_weight"]
    if weight is None:
        raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
    if query is key and key is value:
        q, k, v = _split(_batch_major(project, query, weight, bias), 3, embed_dim)
        return q, k, v
    if key is value:
        w_q, w_kv = weight.split([embed_dim, 2 * embed_dim])
        b_q, b_kv = (None, None) if bias is None else bias.split([embed_dim, 2 * embed_dim])
        k, v = _split(_batch_major(project, key, w_kv, b_kv), 2, embed_dim)
        return _batch_major(project, query, w_q, b_q).contiguous(), k, v
    biases = (None,) * 3 if bias is None else bias.chunk(3)
    return tuple(
        _batch_major(project, x, w, b).contiguous() for x, w, b in zip((query, key, value), weight.chunk(3), biases)
    )


def multi_head_attention(call: dict[str, Any], project: Project) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(attn_output [T, n, E], attention weights or None) as ``F.multi_head_attention_forward(**call)``,
    with ``project(x, W, b)`` (an F.linear on a batch-major x) making the in- and out-projections."""
    query, key, value = call["query"], call["key"], call["value"]
    num_heads, need_weights, is_causal = call["num_heads"], call["need_weights"], call["is_causal"]
    attn_mask, key_padding_mask = call["attn_mask"], call["key_padding_mask"]
    F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    tgt_len, bsz, embed_dim = query.shape
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention takes the is_causal hint
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
            check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False
    if embed_dim != call["embed_dim_to_check"]:
        raise AssertionError(f"was expecting embedding dimension of {call['embed_dim_to_check']}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    if call["use_separate_proj_weight"] and key.shape[:2] != value.shape[:2]:
        raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")
    if not call["use_separate_proj_weight"] and key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")

    q, k, v = _in_projection(call, project)
    if attn_mask is not None and attn_mask.dim() == 2:
        if attn_mask.shape != (tgt_len, key.shape[0]):
            raise RuntimeError(
                f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, key.shape[0])}."
            )
        attn_mask = attn_mask.unsqueeze(0)
    elif attn_mask is not None and attn_mask.dim() == 3:
        if attn_mask.shape != (bsz * num_heads, tgt_len, key.shape[0]):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                               f"{(bsz * num_heads, tgt_len, key.shape[0])}.")
    elif attn_mask is not None:
        raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    if key_padding_mask is not None:
        F._check_key_padding_mask(key_padding_mask, src_len, bsz)
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = call["dropout_p"] if call["training"] else 0.0

    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        heads = torch.bmm(weights, v).view(bsz, num_heads, tgt_len, head_dim)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    concatenated = heads.permute(0, 2, 1, 3).reshape(bsz, tgt_len, embed_dim)  # batch-major [n, T, E]
    output = project(concatenated, call["out_proj_weight"], call["out_proj_bias"]).transpose(0, 1).contiguous()
    if not need_weights:
        return output, None
    weights = weights.view(bsz, num_heads, tgt_len, src_len)
    return output, weights.mean(dim=1) if call["average_attn_weights"] else weights
