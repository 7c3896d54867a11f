"""Capture inside nn.MultiheadAttention (F.multi_head_attention_forward, rebuilt by runtime/attention.py):
the module computes the same outputs and gradients with and without Capture, the recorded projection
inputs are those computed by hand, and the gradients rebuilt from the captured (a, g) are autograd's
(float64, hand-made plans)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kronograph.runtime.capture import Capture
from kronograph.runtime.factors import batch_factors, capture_gradient

from plan_helpers import linear_layer

E, HEADS, FF = 8, 2, 12


def attention_layers(prefix: str, mha: nn.MultiheadAttention, packed: bool = True) -> list:
    """The plan's layers of one attention: the packed in-projection (self-attention only) and out_proj."""
    layers = [linear_layer(f"{prefix}out_proj", f"{prefix}out_proj.weight", f"{prefix}out_proj.bias", (E, E))]
    if packed:
        layers.append(linear_layer(f"{prefix}in_proj", f"{prefix}in_proj_weight", f"{prefix}in_proj_bias", (3 * E, E)))
    return layers


def feed_forward_layers(prefix: str = "") -> list:
    return [linear_layer(f"{prefix}linear1", f"{prefix}linear1.weight", f"{prefix}linear1.bias", (FF, E)),
            linear_layer(f"{prefix}linear2", f"{prefix}linear2.weight", f"{prefix}linear2.bias", (E, FF))]


def grad_bar(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.cat([weight.grad, bias.grad[:, None]], dim=1)[None]


def run(module: nn.Module, inputs: tuple, kwargs: dict, layers, *, capture: bool, seed: int = 0):
    """(output, {name: grad}, capture or None) of a random-weighted loss of the output."""
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if capture:
        with Capture(module, layers) as cap:
            out = module(*inputs, **kwargs)
    else:
        cap, out = None, module(*inputs, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    (torch.sin(out) * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}, cap


def assert_same_with_and_without_capture(module, inputs, kwargs, layers, seed: int = 0):
    want, want_grads, _ = run(module, inputs, kwargs, layers, capture=False, seed=seed)
    got, grads, cap = run(module, inputs, kwargs, layers, capture=True, seed=seed)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=name)
    return cap


def padding_mask(n: int, t: int) -> torch.Tensor:
    mask = torch.zeros(n, t, dtype=torch.bool)
    mask[0, t - 2:] = True
    mask[-1, t - 1] = True
    return mask


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_same_outputs_and_gradients_and_every_projection_recorded(batch_first):
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, batch_first=batch_first).double()
    x = torch.randn(3, 5, E, dtype=torch.float64)
    layers = attention_layers("self_attn.", enc.self_attn) + feed_forward_layers()
    inputs = (x if batch_first else x.transpose(0, 1),)
    cap = assert_same_with_and_without_capture(enc, inputs, dict(src_key_padding_mask=padding_mask(3, 5)), layers)
    assert cap.report().ok and not cap.report().no_gradient
    params = dict(enc.named_parameters())
    for layer in layers:
        rebuilt = capture_gradient(layer, cap.records[layer.name])
        torch.testing.assert_close(rebuilt, grad_bar(params[layer.weight], params[layer.bias]), rtol=0, atol=1e-10)


def heads_by_hand(mha: nn.MultiheadAttention, query, key, value, key_padding_mask=None) -> torch.Tensor:
    """The concatenated heads [n, T, E] of batch-first inputs, from the definition of attention."""
    w_q, w_k, w_v = mha.in_proj_weight.detach().chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.detach().chunk(3)
    n, t, s = query.shape[0], query.shape[1], key.shape[1]
    split = lambda y, length: y.view(n, length, HEADS, E // HEADS).transpose(1, 2)  # noqa: E731
    q, k, v = split(query @ w_q.T + b_q, t), split(key @ w_k.T + b_k, s), split(value @ w_v.T + b_v, s)
    scores = q @ k.transpose(-1, -2) / math.sqrt(E // HEADS)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, E)


@pytest.mark.parametrize("batch_first", [True, False])
def test_recorded_inputs_are_the_projection_inputs_batch_major(batch_first):
    """in_proj sees the layer input, out_proj the concatenated heads, both as [n, T, E] whatever the layout."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first).double()
    x = torch.randn(3, 5, E, dtype=torch.float64)
    mask = padding_mask(3, 5)
    arg = x if batch_first else x.transpose(0, 1)
    layers = attention_layers("", mha)
    with Capture(mha, layers) as cap:
        mha(arg, arg, arg, key_padding_mask=mask, need_weights=False)
    torch.testing.assert_close(cap.records["in_proj"][0].a, x, rtol=0, atol=0)
    torch.testing.assert_close(cap.records["out_proj"][0].a, heads_by_hand(mha, x, x, x, mask), rtol=0, atol=1e-12)
    proj = x @ mha.in_proj_weight.detach().T + mha.in_proj_bias.detach()
    torch.testing.assert_close(cap.records["in_proj"][0].output.detach(), proj, rtol=0, atol=1e-12)


@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
def test_cross_attention_with_weights_and_masks(need_weights, average):
    """Packed cross-attention: the slices of in_proj_weight are no plan layer (the exporter leaves it
    unmatched), out_proj is recorded; the attention weights are torch's."""
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True).double()
    query, memory = torch.randn(3, 4, E, dtype=torch.float64), torch.randn(3, 6, E, dtype=torch.float64)
    attn_mask = torch.rand(4, 6) > 0.6
    attn_mask[:, 0] = False
    kwargs = dict(key_padding_mask=padding_mask(3, 6), attn_mask=attn_mask, need_weights=need_weights,
                  average_attn_weights=average)
    layers = attention_layers("", mha, packed=False)
    cap = assert_same_with_and_without_capture(mha, (query, memory, memory), kwargs, layers)
    assert cap.report().ok
    torch.testing.assert_close(capture_gradient(layers[0], cap.records["out_proj"]),
                               grad_bar(mha.out_proj.weight, mha.out_proj.bias), rtol=0, atol=1e-10)
    with torch.no_grad():
        want = mha(query, memory, memory, **kwargs)[1]
        with Capture(mha, layers):
            got = mha(query, memory, memory, **kwargs)[1]
    assert (got is None) == (not need_weights)
    if need_weights:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_separate_projection_weights_are_recorded():
    """kdim != embed_dim: q_proj_weight, k_proj_weight, v_proj_weight are three layers of one site each
    (the exporter gives them no bias: in_proj_bias is split, and g is the same before and after it)."""
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(E, HEADS, kdim=5, vdim=5, batch_first=True).double()
    query, memory = torch.randn(3, 4, E, dtype=torch.float64), torch.randn(3, 6, 5, dtype=torch.float64)
    layers = [linear_layer("q", "q_proj_weight", None, (E, E)), linear_layer("k", "k_proj_weight", None, (E, 5)),
              linear_layer("v", "v_proj_weight", None, (E, 5)), *attention_layers("", mha, packed=False)]
    cap = assert_same_with_and_without_capture(mha, (query, memory, memory), dict(key_padding_mask=padding_mask(3, 6)),
                                               layers)
    assert cap.report().ok
    torch.testing.assert_close(cap.records["k"][0].a, memory, rtol=0, atol=0)
    for layer in layers[:3]:
        weight = dict(mha.named_parameters())[layer.weight]
        rebuilt = capture_gradient(layer, cap.records[layer.name])
        torch.testing.assert_close(rebuilt, weight.grad[None], rtol=0, atol=1e-10)


def test_decoder_layer_with_causal_mask_and_dropout():
    """Dropout draws the same random numbers as torch's function; the causal self-attention and the
    cross-attention of a decoder layer give torch's outputs and gradients."""
    torch.manual_seed(4)
    dec = nn.TransformerDecoderLayer(E, HEADS, FF, dropout=0.3, batch_first=True).double()
    target, memory = torch.randn(3, 5, E, dtype=torch.float64), torch.randn(3, 6, E, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    layers = attention_layers("self_attn.", dec.self_attn) + attention_layers(
        "multihead_attn.", dec.multihead_attn, packed=False) + feed_forward_layers()
    kwargs = dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=padding_mask(3, 6))
    cap = assert_same_with_and_without_capture(dec, (target, memory), kwargs, layers, seed=7)
    assert cap.report().ok
    params = dict(dec.named_parameters())
    for layer in layers:
        rebuilt = capture_gradient(layer, cap.records[layer.name])
        torch.testing.assert_close(rebuilt, grad_bar(params[layer.weight], params[layer.bias]), rtol=0, atol=1e-10)


def test_statistics_of_a_subset_of_examples_from_batch_major_records():
    """T a multiple of n (sequence-first would read as batch-major): the factors of examples ``index`` of
    the captured batch equal those of a capture of those examples alone (summed loss, grad_scale 1)."""
    torch.manual_seed(5)
    enc = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, batch_first=False).double()
    x = torch.randn(4, 2, E, dtype=torch.float64)  # [T=4, n=2, E]
    layers = attention_layers("self_attn.", enc.self_attn)
    index = torch.tensor([1])
    factors = []
    for inputs, pick in ((x, index), (x[:, index], None)):
        with Capture(enc, layers) as cap:
            enc(inputs).pow(2).sum().backward()
        factors.append({layer.name: batch_factors(layer, cap.records[layer.name], batch_size=inputs.shape[1],
                                                  index=pick, grad_scale=1.0, dtype=torch.float64)
                        for layer in layers})
    for layer in layers:
        for got, want in zip(*(f[layer.name] for f in factors)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_unsupported_calls_and_sliced_plan_weights_run_torch_unrecorded():
    """bias_k/bias_v, and cross-attention whose packed in_proj_weight is a plan layer (torch projects with
    slices of it): torch's own function runs, nothing of the attention is recorded (report lists it)."""
    torch.manual_seed(6)
    x, memory = torch.randn(2, 3, E, dtype=torch.float64), torch.randn(2, 4, E, dtype=torch.float64)
    with_bias_kv = nn.MultiheadAttention(E, HEADS, add_bias_kv=True, batch_first=True).double()
    plain = nn.MultiheadAttention(E, HEADS, batch_first=True).double()
    for mha, inputs in ((with_bias_kv, (x, x, x)), (plain, (x, memory, memory))):
        layers = attention_layers("", mha)
        cap = assert_same_with_and_without_capture(mha, inputs, {}, layers)
        assert set(cap.report().uncalled) == {"in_proj", "out_proj"}
