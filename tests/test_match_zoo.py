"""Architectures nobody wrote for kronograph: torchvision, timm and transformers models built without
weights (nothing is downloaded), compiled once each on small inputs.

The expected layers are what a person reading the model would list: every nn.Conv2d / nn.Linear (and
transformers' Conv1D) is one layer, except a weight that is also read by something else (a tied
embedding), and everything else (norms, embeddings, tokens) is unmatched with a reason.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import kronograph


def compile_module(model: nn.Module, *inputs: torch.Tensor) -> kronograph.CompiledModel:
    return kronograph.compile(model.eval(), example_inputs=inputs, loss="cross_entropy")


def modules_of(model: nn.Module, *types: type) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, types)}


def reasons(cm) -> dict[str, str]:
    return {entry.name: entry.reason for entry in cm.plan.unmatched}


def assert_partition(cm, model: nn.Module) -> None:
    """Every trainable parameter is a layer's weight or bias, or unmatched with a reason; never two of these."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    listed = [layer.weight for layer in cm.layers] + [layer.bias for layer in cm.layers if layer.bias]
    listed += cm.unmatched
    assert sorted(listed) == sorted(trainable)
    assert all(entry.reason for entry in cm.plan.unmatched)


def assert_layers_follow_modules(cm, modules: dict[str, nn.Module]) -> None:
    """Each layer is the module of the same name, with its weight, bias, kind and dimensions."""
    assert sorted(layer.name for layer in cm.layers) == sorted(modules)
    for layer in cm.layers:
        module = modules[layer.name]
        assert layer.weight == f"{layer.name}.weight"
        assert layer.bias == (f"{layer.name}.bias" if module.bias is not None else None)
        assert len(layer.sites) == 1
        assert layer.sites[0].module == layer.name
        if isinstance(module, nn.Linear):
            assert (layer.kind, layer.weight_layout) == ("linear", "out_in")
            assert (layer.in_features, layer.out_features) == (module.in_features, module.out_features)
        else:
            assert layer.kind == "conv2d"
            assert layer.groups == module.groups
            kh, kw = module.kernel_size
            assert layer.in_features == module.in_channels // module.groups * kh * kw
            assert layer.out_features == module.out_channels // module.groups
            assert layer.geometry.stride == module.stride


def assert_norms_unmatched(cm, op: str) -> None:
    """Every unmatched parameter is a norm's scale or shift, and its reason names the norm op."""
    for name, reason in reasons(cm).items():
        assert op in reason, (name, reason)


# --- torchvision ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision():
    return pytest.importorskip("torchvision")


def test_resnet18(torchvision):
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    cm = compile_module(model, torch.randn(1, 3, 32, 32))
    assert len(cm.layers) == 21
    assert Counter(layer.kind for layer in cm.layers) == {"conv2d": 20, "linear": 1}
    assert_layers_follow_modules(cm, modules_of(model, nn.Conv2d, nn.Linear))
    assert sum(layer.sites[0].module.endswith("downsample.0") for layer in cm.layers) == 3
    assert len(cm.unmatched) == 40  # 20 batch norms, weight and bias each
    assert_norms_unmatched(cm, "BatchNormalization")
    assert_partition(cm, model)


def test_mobilenet_v2_depthwise(torchvision):
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    cm = compile_module(model, torch.randn(1, 3, 32, 32))
    assert Counter(layer.kind for layer in cm.layers) == {"conv2d": 52, "linear": 1}
    assert_layers_follow_modules(cm, modules_of(model, nn.Conv2d, nn.Linear))
    depthwise = [layer for layer in cm.layers if layer.groups > 1]
    assert len(depthwise) == 17
    for layer in depthwise:
        channels = layer.weight_shape[0]
        assert layer.groups == channels and layer.weight_shape[1] == 1
        assert (layer.a_dim, layer.g_dim) == (9, 1)  # one 3x3 patch per channel, no bias
    assert_norms_unmatched(cm, "BatchNormalization")
    assert_partition(cm, model)


# --- timm ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


def test_timm_resnet10t(timm):
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    cm = compile_module(model, torch.randn(1, 3, 32, 32))
    assert Counter(layer.kind for layer in cm.layers) == {"conv2d": 14, "linear": 1}
    assert_layers_follow_modules(cm, modules_of(model, nn.Conv2d, nn.Linear))
    assert_norms_unmatched(cm, "BatchNormalization")
    assert_partition(cm, model)


def test_timm_vit(timm):
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=10,
    )
    cm = compile_module(model, torch.randn(1, 3, 32, 32))
    # patch embedding + per block qkv, proj, fc1, fc2 + head
    assert Counter(layer.kind for layer in cm.layers) == {"conv2d": 1, "linear": 9}
    assert_layers_follow_modules(cm, modules_of(model, nn.Conv2d, nn.Linear))
    qkv = cm.plan.layer("blocks.0.attn.qkv")
    assert (qkv.a_dim, qkv.g_dim) == (33, 96)  # q, k and v from one product: one block
    assert cm.plan.layer("patch_embed.proj").geometry.stride == (8, 8)
    why = reasons(cm)
    assert set(why) == {"cls_token", "pos_embed"} | {
        name for name, p in model.named_parameters() if "norm" in name
    }
    assert all("LayerNormalization" in reason for name, reason in why.items() if "norm" in name)
    assert_partition(cm, model)


# --- transformers --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


TOKENS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))


def test_bert_masked_lm(transformers):
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        type_vocab_size=2,
    )
    model = transformers.BertForMaskedLM(config)
    decoder = model.cls.predictions.decoder
    assert decoder.weight is model.bert.embeddings.word_embeddings.weight  # tied
    cm = compile_module(model, TOKENS)
    # per layer query, key, value, attention output, intermediate, output; plus the MLM transform
    linears = {name: m for name, m in modules_of(model, nn.Linear).items() if m is not decoder}
    assert len(linears) == 13
    assert_layers_follow_modules(cm, linears)
    why = reasons(cm)
    word = "bert.embeddings.word_embeddings.weight"
    assert "Gather" in why[word] and why[word].startswith("tied:")  # also the decoder's weight: a tie of the plan
    assert [(tie.output.weight, tie.output.bias) for tie in cm.plan.ties] == [(word, "cls.predictions.bias")]
    assert word in why["cls.predictions.bias"]  # the tied decoder's bias follows its weight
    for name in ("position_embeddings", "token_type_embeddings"):
        assert "Gather" in why[f"bert.embeddings.{name}.weight"]
    assert all("LayerNormalization" in reason for name, reason in why.items() if "LayerNorm" in name)
    assert_partition(cm, model)


def test_gpt2_conv1d_is_linear_in_out(transformers):
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    model.config.use_cache = False
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    cm = compile_module(model, TOKENS)
    conv1d = modules_of(model, transformers.pytorch_utils.Conv1D)
    assert len(conv1d) == 8  # per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    assert sorted(layer.name for layer in cm.layers) == sorted(conv1d)
    for layer in cm.layers:
        module = conv1d[layer.name]
        d_in, d_out = module.weight.shape  # Conv1D stores W as [in, out]: y = x @ W + b
        assert (layer.kind, layer.weight_layout) == ("linear", "in_out")
        assert (layer.weight, layer.bias) == (f"{layer.name}.weight", f"{layer.name}.bias")
        assert (layer.in_features, layer.out_features, layer.a_dim, layer.g_dim) == (d_in, d_out, d_in + 1, d_out)
        assert layer.sites[0].module == layer.name
    assert cm.plan.layer("transformer.h.0.attn.c_attn").g_dim == 96
    why = reasons(cm)
    assert "Gather" in why["transformer.wte.weight"] and why["transformer.wte.weight"].startswith("shared:")
    assert "Gather" in why["transformer.wpe.weight"]
    assert all("LayerNormalization" in reason for name, reason in why.items() if ".ln_" in name)
    assert_partition(cm, model)
