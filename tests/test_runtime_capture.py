"""Capture of (a, g) per site on the user's own module: gradients recomputed from the captures equal
autograd's .grad, and the documented behaviour on calls that do not fit the plan (float64)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kronograph.passes.plan import ConvGeometry, Layer, Site
from kronograph.runtime.capture import Capture, CaptureError
from kronograph.runtime.factors import batch_factors, capture_gradient
from kronograph.runtime.wbar import gather, scatter

from plan_helpers import conv_layer, linear_layer

ATOL = 1e-10



def grad_bar(weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1, in_out: bool = False) -> torch.Tensor:
    """[groups, out_g, in_g (+1)] built by hand from .grad."""
    w = weight.grad.T if in_out else weight.grad.reshape(weight.shape[0], -1)
    w = w.reshape(groups, w.shape[0] // groups, -1)
    if bias is None:
        return w
    return torch.cat([w, bias.grad.reshape(groups, -1, 1)], dim=2)


class GPT2Conv1D(nn.Module):
    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64) / 2)
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Shared(nn.Module):
    """One weight at two sites, and a functional x @ W.T on a raw Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3).double()
        self.raw = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(torch.tanh(self.lin(x)))) @ self.raw.T


def _check(model: nn.Module, layers: tuple[Layer, ...], x: torch.Tensor, groups: dict[str, int] | None = None) -> None:
    with Capture(model, layers) as cap:
        out = model(x)
    (torch.sin(out) * torch.randn_like(out)).sum().backward()
    params = dict(model.named_parameters())
    for layer in layers:
        bias = params[layer.bias] if layer.bias else None
        want = grad_bar(params[layer.weight], bias, layer.groups, layer.weight_layout == "in_out")
        torch.testing.assert_close(capture_gradient(layer, cap.records[layer.name]), want, rtol=0, atol=ATOL)
    assert cap.report().ok


def test_gradients_from_captures_linear_and_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.Tanh(),
        nn.Conv2d(4, 4, 2, groups=2, dilation=2, padding=(1, 0)), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 1, 3),
    ).double()
    layers = (conv_layer("0", model[0]), conv_layer("2", model[2]), linear_layer("5", "5.weight", "5.bias", (3, 12)))
    _check(model, layers, torch.randn(3, 2, 5, 6, dtype=torch.float64))


def test_gradients_from_captures_gpt2_addmm_shared_and_transposed() -> None:
    torch.manual_seed(1)
    gpt2 = GPT2Conv1D(3, 5)
    layer = linear_layer("c", "weight", "bias", (3, 5), layout="in_out")
    _check(gpt2, (layer,), torch.randn(2, 4, 3, dtype=torch.float64))
    shared = Shared()
    layers = (linear_layer("lin", "lin.weight", "lin.bias", (3, 3), sites=2), linear_layer("raw", "raw", None, (2, 3)))
    _check(shared, layers, torch.randn(4, 3, dtype=torch.float64))


def test_conv1d_and_conv3d_gradients() -> None:
    torch.manual_seed(2)
    c1 = nn.Conv1d(2, 4, 3, stride=2, padding="valid", groups=2).double()
    layer = dataclasses.replace(conv_layer("x", c1), name="c", weight="weight", bias="bias")
    _check(c1, (layer,), torch.randn(2, 2, 9, dtype=torch.float64))
    c3 = nn.Conv3d(2, 3, (2, 1, 2), padding=(1, 0, 1), bias=False).double()
    layer = dataclasses.replace(conv_layer("x", c3), name="c", weight="weight", bias=None)
    _check(c3, (layer,), torch.randn(2, 2, 3, 2, 3, dtype=torch.float64))


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2), (3, 4, 5, 4)),
    (lambda: nn.ConvTranspose1d(3, 2, 4, stride=2, padding=1), (2, 3, 7)),
    (lambda: nn.ConvTranspose3d(2, 2, (2, 3, 1), stride=(1, 2, 2), bias=False), (2, 2, 3, 3, 2)),
], ids=["2d", "1d", "3d"])
def test_transposed_convolution_gradients(make, shape) -> None:
    """A transposed convolution's sites are those of the convolution it equals (zeros between the inputs, the
    kernel flipped, channel axes swapped): their sum_t g_t a_t^T, scattered to the weight's own [in, out_g,
    *kernel] layout, is autograd's .grad; gather and scatter are inverse."""
    torch.manual_seed(4)
    conv = make().double()
    layer = dataclasses.replace(conv_layer("c", conv), weight="weight", bias="bias" if conv.bias is not None
                                else None)
    with Capture(conv, (layer,)) as cap:
        out = conv(torch.randn(*shape, dtype=torch.float64))
    (torch.sin(out) * torch.randn_like(out)).sum().backward()
    weight, bias = scatter(layer, capture_gradient(layer, cap.records["c"]))
    torch.testing.assert_close(weight, conv.weight.grad, rtol=0, atol=ATOL)
    if conv.bias is not None:
        torch.testing.assert_close(bias, conv.bias.grad, rtol=0, atol=ATOL)
    random = torch.randn_like(conv.weight)
    assert torch.equal(scatter(layer, gather(layer, random))[0], random)


def test_capture_only_inside_the_context() -> None:
    model = nn.Linear(3, 2).double()
    layer = linear_layer("l", "weight", "bias", (2, 3))
    cap = Capture(model, (layer,))
    with cap:
        model(torch.randn(1, 3, dtype=torch.float64))
    model(torch.randn(1, 3, dtype=torch.float64))
    assert len(cap.records["l"]) == 1
    assert cap.records["l"][0].g is None


def test_extra_calls_raise_or_pool_and_uncalled_layers_are_reported() -> None:
    torch.manual_seed(3)
    model = Shared()
    one_site = (
        linear_layer("lin", "lin.weight", "lin.bias", (3, 3), sites=1),
        linear_layer("raw", "raw", None, (2, 3)),
    )
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(CaptureError, match="called 2 times but the plan has 1"):
        with Capture(model, one_site):
            model(x)
    with Capture(model, one_site, strict=False) as cap:
        model(x).sum().backward()
    assert cap.report().extra == {"lin": (2, 1)}
    a, _ = batch_factors(one_site[0], cap.records["lin"], batch_size=2, dtype=torch.float64)
    assert torch.isfinite(a).all()

    three_sites = (linear_layer("lin", "lin.weight", "lin.bias", (3, 3), sites=3), *one_site[1:])
    model.unused = nn.Linear(1, 1).double()
    with Capture(model, (*three_sites, linear_layer("unused", "unused.weight", "unused.bias", (1, 1)))) as cap:
        model(x)
    report = cap.report()
    assert report.uncalled == ("unused",) and report.partial == {"lin": (2, 3)} and not report.ok
    with pytest.raises(CaptureError, match="never called"):
        cap.check()


def test_layout_mismatch_and_weight_as_left_operand_raise() -> None:
    w = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    holder = nn.Module()
    holder.w = w
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(CaptureError, match="weight_layout='out_in'"):
        with Capture(holder, (linear_layer("w", "w", None, (3, 3)),)):
            x @ w
    with pytest.raises(CaptureError, match="left operand"):
        with Capture(holder, (linear_layer("w", "w", None, (3, 3), layout="in_out"),)):
            w @ x.T


def test_gradients_from_a_sampled_loss_leave_grad_untouched() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    layers = (linear_layer("0", "0.weight", "0.bias", (4, 3)), linear_layer("2", "2.weight", "2.bias", (2, 4)))
    x = torch.randn(5, 3, dtype=torch.float64)
    with Capture(model, layers) as cap:
        logits = model(x)
    sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
    cap.gradients_from(F.cross_entropy(logits, sampled), retain_graph=True)
    assert all(p.grad is None for p in model.parameters())
    sampled_g = cap.records["0"][0].g.clone()
    F.cross_entropy(logits, torch.zeros(5, dtype=torch.long)).backward()  # hooks now record the real loss
    assert not torch.allclose(cap.records["0"][0].g, sampled_g)
    want = grad_bar(model[0].weight, model[0].bias)
    torch.testing.assert_close(capture_gradient(layers[0], cap.records["0"]), want, rtol=0, atol=ATOL)
    cap.release_outputs()
    assert cap.records["0"][0].output is None


def test_input_modified_in_place_after_the_call_is_detected() -> None:
    model = nn.Linear(3, 2).double()
    layer = linear_layer("l", "weight", "bias", (2, 3))
    x = torch.randn(4, 3, dtype=torch.float64)
    with Capture(model, (layer,)) as cap:
        model(x).sum().backward()
    x.mul_(2)
    with pytest.raises(CaptureError, match="modified in place"):
        batch_factors(layer, cap.records["l"], batch_size=4)


def test_transformers_gpt2_sites_give_autograd_gradients() -> None:
    """transformers' own GPT-2 (Conv1D: addmm with [in, out] weights), compiled, then captured."""
    transformers = pytest.importorskip("transformers")
    import kronograph
    from kronograph.runtime.wbar import gather_grad

    torch.manual_seed(5)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=17, n_positions=8, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = transformers.GPT2LMHeadModel(config).double()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.gpt(input_ids=ids, use_cache=False).logits

    model = LM()
    ids = torch.randint(0, 17, (2, 5))
    cm = kronograph.compile(model, example_inputs=(ids,))
    assert len(cm.layers) == 4 and all(layer.weight_layout == "in_out" for layer in cm.layers)
    with Capture(model, cm.plan) as cap:
        logits = model(ids)
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert cap.report().ok
    params = dict(model.named_parameters())
    for layer in cm.layers:
        got = capture_gradient(layer, cap.records[layer.name])
        torch.testing.assert_close(got, gather_grad(layer, params), rtol=0, atol=ATOL)
        a, g = batch_factors(layer, cap.records[layer.name], batch_size=2, dtype=torch.float64)
        assert a.shape == (1, layer.a_dim, layer.a_dim) and g.shape == (1, layer.g_dim, layer.g_dim)
