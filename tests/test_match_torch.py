"""The LayerPlan of PyTorch modules exported by the dynamo exporter: exact layers, sites and reasons.

Each model is compiled once per module (export costs about a second); the tests read the plan.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronograph

from plan_helpers import reasons, summary


def compile_module(model: nn.Module, *inputs: torch.Tensor) -> kronograph.CompiledModel:
    return kronograph.compile(model, example_inputs=inputs, loss="cross_entropy")


def values(cm) -> dict:
    """Every tensor of the compiled graph by name."""
    graph = cm.graph.graph
    found = {value.name: value for value in graph.inputs}
    for node in graph:
        found.update({value.name: value for value in node.outputs})
    return found


def assert_partition(cm, model: nn.Module) -> None:
    """Every trainable parameter is exactly one of: a layer weight, a layer bias, unmatched (with a reason)."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    in_layers = [layer.weight for layer in cm.layers] + [layer.bias for layer in cm.layers if layer.bias]
    listed = in_layers + cm.unmatched
    assert sorted(listed) == sorted(trainable)
    assert all(entry.reason for entry in cm.plan.unmatched)
    assert list(cm.plan.parameters) == trainable


# --- 1. MLP: nn.Linear, F.linear on raw parameters, no bias, rank-3 inputs ------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12, bias=False))
        self.w = nn.Parameter(torch.randn(10, 12) / 4)
        self.b = nn.Parameter(torch.zeros(10))
        self.v = nn.Parameter(torch.randn(4, 10) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        h = torch.relu(F.linear(h, self.w, self.b))
        return F.linear(h, self.v)


MLP_LAYERS = [
    ("body.0", "linear", "body.0.weight", "body.0.bias", "out_in", 8, 16, 9, 16, 1, 1),
    ("body.2", "linear", "body.2.weight", None, "out_in", 16, 12, 16, 12, 1, 1),
    ("w", "linear", "w", "b", "out_in", 12, 10, 13, 10, 1, 1),
    ("v", "linear", "v", None, "out_in", 10, 4, 10, 4, 1, 1),
]


@pytest.fixture(scope="module", params=[(4, 8), (2, 5, 8)], ids=["batch", "sequence"])
def mlp(request):
    model = MLP()
    return model, compile_module(model, torch.randn(*request.param)), request.param


def test_mlp_layers_are_exact(mlp):
    model, cm, _ = mlp
    assert [summary(layer) for layer in cm.layers] == MLP_LAYERS
    assert cm.unmatched == []
    assert cm.plan.inputs == ("x",)
    assert_partition(cm, model)
    for layer in cm.layers:
        assert layer.geometry is None
        assert layer.weight_shape == tuple(model.get_parameter(layer.weight).shape)


def test_mlp_sites_point_at_the_layer_tensors(mlp):
    """Activation and pre-activation of each site have the layer's in/out features last, same rank as x."""
    _, cm, shape = mlp
    tensors = values(cm)
    first = cm.plan.layer("body.0").sites[0]
    assert first.activation == "x"
    for layer in cm.layers:
        (site,) = layer.sites
        a, s = tensors[site.activation], tensors[site.preactivation]
        assert len(a.shape) == len(s.shape) == len(shape)
        assert a.shape[-1] == layer.in_features and s.shape[-1] == layer.out_features
        assert not site.activation_transposed
    # a bias is inside the pre-activation: its producer adds it (Gemm's C or the Add after MatMul)
    with_bias = tensors[cm.plan.layer("w").sites[0].preactivation].producer()
    assert with_bias.op_type in ("Gemm", "Add")


def test_mlp_sites_know_their_module(mlp):
    _, cm, _ = mlp
    modules = {layer.name: layer.sites[0].module for layer in cm.layers}
    assert modules == {"body.0": "body.0", "body.2": "body.2", "w": "", "v": ""}
    assert all(layer.sites[0].call for layer in cm.layers)


# --- shared layer: the same nn.Linear applied twice -------------------------------------------------------


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


@pytest.mark.parametrize("shape", [(4, 8), (2, 3, 8)], ids=["batch", "sequence"])
def test_shared_layer_is_one_layer_with_two_sites(shape):
    model = Tower()
    cm = compile_module(model, torch.randn(*shape))
    assert [summary(layer) for layer in cm.layers] == [
        ("fc", "linear", "fc.weight", "fc.bias", "out_in", 8, 8, 9, 8, 1, 2),
        ("head", "linear", "head.weight", "head.bias", "out_in", 8, 3, 9, 3, 1, 1),
    ]
    first, second = cm.plan.layer("fc").sites
    assert first.activation == "x"
    assert second.activation != first.activation and second.preactivation != first.preactivation
    assert first.module == second.module == "fc"
    assert first.call != second.call
    assert cm.unmatched == []


class SharedWeightOwnBiases(nn.Module):
    """One weight in two F.linear calls, each with a bias of its own (ALBERT-like sharing of a projection)."""

    def __init__(self, same_bias: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.b2 = self.b1 if same_bias else nn.Parameter(self.b1.detach().clone())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(F.linear(torch.tanh(F.linear(x, self.w, self.b1)), self.w, self.b2)))


def test_a_shared_weight_whose_sites_add_their_own_biases_keeps_a_block_without_bias():
    """The two sites differ in bias only: one layer of two sites without bias (the biases outside every block, with
    the reason), whose K-FAC factors are the one-bias twin's without its homogeneous coordinate (b2 equal to b1 in
    value: the same forward)."""
    torch.manual_seed(0)
    model = SharedWeightOwnBiases()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    cm = compile_module(model, x[:2])
    assert [summary(layer) for layer in cm.layers][0] == ("w", "linear", "w", None, "out_in", 8, 8, 8, 8, 1, 2)
    assert set(cm.unmatched) == {"b1", "b2"}
    assert "different biases" in reasons(cm)["b2"]
    torch.manual_seed(0)
    twin = SharedWeightOwnBiases(same_bias=True)
    twin.load_state_dict(model.state_dict())  # (b2 is b1 there; the two are equal in value here)
    opt = kronograph.optim.KFAC(kronograph.compile(model, (x[:2],), loss="cross_entropy"), fisher="empirical",
                                seed=0, factor_dtype=torch.float64)
    reference = kronograph.optim.KFAC(kronograph.compile(twin, (x[:2],), loss="cross_entropy"),
                                      fisher="empirical", seed=0, factor_dtype=torch.float64)
    assert reference.blocks["w"].layer.bias == "b1"
    opt.step(x, y)
    reference.step(x, y)
    torch.testing.assert_close(opt.blocks["w"].a[0], reference.blocks["w"].a[0][:-1, :-1])
    torch.testing.assert_close(opt.blocks["w"].g, reference.blocks["w"].g)
    assert set(opt.unmatched) == {"b1", "b2"}


# --- 2. residual CNN with batch norm, dilated, strided and 1x1 shortcut convolutions ----------------------


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.short = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        h = self.down(h) + self.short(h)
        return self.fc(h.mean((2, 3)))


CNN_LAYERS = [
    ("conv1", "conv2d", "conv1.weight", None, "out_in", 27, 8, 27, 8, 1, 1),
    ("conv2", "conv2d", "conv2.weight", "conv2.bias", "out_in", 72, 8, 73, 8, 1, 1),
    ("down", "conv2d", "down.weight", "down.bias", "out_in", 72, 16, 73, 16, 1, 1),
    ("short", "conv2d", "short.weight", "short.bias", "out_in", 8, 16, 9, 16, 1, 1),
    ("fc", "linear", "fc.weight", "fc.bias", "out_in", 16, 5, 17, 5, 1, 1),
]
CNN_GEOMETRY = {  # kernel, stride, padding (ONNX order), dilation
    "conv1": ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "conv2": ((3, 3), (1, 1), (2, 2, 2, 2), (2, 2)),
    "down": ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    "short": ((1, 1), (2, 2), (0, 0, 0, 0), (1, 1)),
}


@pytest.fixture(scope="module", params=["train", "eval"])
def cnn(request):
    torch.manual_seed(0)
    model = ResidualCNN()
    with torch.no_grad():  # non-trivial running statistics, to see that compile leaves them alone
        model(torch.randn(4, 3, 16, 16))
    model.train(request.param == "train")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    cm = compile_module(model, torch.randn(2, 3, 16, 16))
    return model, cm, before, request.param


def test_cnn_layers_are_exact(cnn):
    model, cm, _, _ = cnn
    assert [summary(layer) for layer in cm.layers] == CNN_LAYERS
    for name, (kernel, stride, padding, dilation) in CNN_GEOMETRY.items():
        geometry = cm.plan.layer(name).geometry
        assert (geometry.kernel, geometry.stride, geometry.padding, geometry.dilation) == (
            kernel,
            stride,
            padding,
            dilation,
        )
        assert geometry.groups == 1
    assert_partition(cm, model)


def test_cnn_batch_norm_is_unmatched_and_its_statistics_are_not_parameters(cnn):
    model, cm, _, _ = cnn
    assert cm.unmatched == ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"]
    for name, reason in reasons(cm).items():
        assert "BatchNormalization" in reason, (name, reason)
    buffers = {name for name, _ in model.named_buffers()}
    assert {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"} <= buffers
    assert not buffers & set(cm.plan.parameters)
    assert not buffers & set(cm.unmatched)


def test_cnn_compile_leaves_the_model_alone(cnn):
    model, _, before, mode = cnn
    assert model.training == (mode == "train")
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


def test_cnn_shortcut_and_main_path_read_the_same_activation(cnn):
    _, cm, _, _ = cnn
    down, short = cm.plan.layer("down").sites[0], cm.plan.layer("short").sites[0]
    assert down.activation == short.activation
    assert cm.plan.layer("conv1").sites[0].activation == "x"


# --- 3. Conv1d, grouped and depthwise convolutions (1-D to 3-D) -------------------------------------------


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 5, padding=2)
        self.g = nn.Conv1d(8, 6, 3, groups=2, bias=False)
        self.dw = nn.Conv1d(6, 6, 3, groups=6, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3)
        self.g2 = nn.Conv2d(8, 8, (3, 2), groups=2)
        self.dw2 = nn.Conv2d(8, 8, 3, groups=8, bias=False)
        self.c3 = nn.Conv3d(2, 4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a = self.dw(torch.relu(self.g(torch.relu(self.c1(x))))).mean(-1)
        b = self.dw2(self.g2(self.c2(y))).mean((2, 3))
        c = self.c3(z).mean((2, 3, 4))
        return a.sum(1) + b.sum(1) + c.sum(1)


@pytest.fixture(scope="module")
def grouped():
    model = GroupedNet()
    inputs = (torch.randn(2, 4, 16), torch.randn(2, 3, 12, 12), torch.randn(2, 2, 5, 5, 5))
    return model, compile_module(model, *inputs)


def test_grouped_layers_are_exact(grouped):
    model, cm = grouped
    assert [(layer.name, layer.kind, layer.groups, layer.a_dim, layer.g_dim, layer.bias) for layer in cm.layers] == [
        ("c1", "conv1d", 1, 4 * 5 + 1, 8, "c1.bias"),
        ("g", "conv1d", 2, 4 * 3, 3, None),
        ("dw", "conv1d", 6, 1 * 3 + 1, 1, "dw.bias"),
        ("c2", "conv2d", 1, 3 * 9 + 1, 8, "c2.bias"),
        ("g2", "conv2d", 2, 4 * 3 * 2 + 1, 4, "g2.bias"),
        ("dw2", "conv2d", 8, 9, 1, None),
        ("c3", "conv3d", 1, 2 * 8 + 1, 4, "c3.bias"),
    ]
    assert cm.unmatched == []
    assert_partition(cm, model)


def test_grouped_dimensions_follow_the_module(grouped):
    """a_dim = in_per_group * prod(kernel) + bias, g_dim = out / groups, one block pair per group."""
    model, cm = grouped
    for layer in cm.layers:
        module = model.get_submodule(layer.name)
        in_per_group = module.in_channels // module.groups
        assert layer.groups == module.groups
        assert layer.a_dim == in_per_group * math.prod(module.kernel_size) + (module.bias is not None)
        assert layer.g_dim == module.out_channels // module.groups
        assert layer.geometry.kernel == module.kernel_size
        assert layer.geometry.stride == module.stride
        assert layer.geometry.dilation == module.dilation
        assert layer.geometry.padding == tuple(module.padding) * 2
        assert layer.num_params == sum(p.numel() for p in module.parameters())


# --- 4. nn.TransformerEncoderLayer inside a small model ---------------------------------------------------


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.inp(x)).mean(1))


@pytest.fixture(scope="module")
def encoder():
    model = Encoder().eval()
    return model, compile_module(model, torch.randn(2, 5, 6))


def test_transformer_encoder_layer(encoder):
    """Self-attention reads in_proj_weight whole: one [3d, d] product of x gives q, k and v together.

    The exporter keeps that single MatMul (the chunking into q, k, v happens on its output), so the
    whole [48, 16] matrix is one linear layer with one A (17 x 17) and one G (48 x 48): exact K-FAC.
    """
    model, cm = encoder
    assert [summary(layer) for layer in cm.layers] == [
        ("inp", "linear", "inp.weight", "inp.bias", "out_in", 6, 16, 7, 16, 1, 1),
        (
            "enc.self_attn.in_proj",
            "linear",
            "enc.self_attn.in_proj_weight",
            "enc.self_attn.in_proj_bias",
            "out_in",
            16,
            48,
            17,
            48,
            1,
            1,
        ),
        (
            "enc.self_attn.out_proj",
            "linear",
            "enc.self_attn.out_proj.weight",
            "enc.self_attn.out_proj.bias",
            "out_in",
            16,
            16,
            17,
            16,
            1,
            1,
        ),
        ("enc.linear1", "linear", "enc.linear1.weight", "enc.linear1.bias", "out_in", 16, 32, 17, 32, 1, 1),
        ("enc.linear2", "linear", "enc.linear2.weight", "enc.linear2.bias", "out_in", 32, 16, 33, 16, 1, 1),
        ("head", "linear", "head.weight", "head.bias", "out_in", 16, 3, 17, 3, 1, 1),
    ]
    assert cm.unmatched == ["enc.norm1.weight", "enc.norm1.bias", "enc.norm2.weight", "enc.norm2.bias"]
    assert all("LayerNormalization" in reason for reason in reasons(cm).values())
    assert cm.plan.layer("enc.self_attn.in_proj").sites[0].module == "enc.self_attn"
    assert cm.plan.layer("enc.linear1").sites[0].module == "enc.linear1"
    assert_partition(cm, model)


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.memory = nn.Linear(4, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        m = self.memory(m)
        return self.attn(x, m, m, need_weights=False)[0]


def test_cross_attention_slices_in_proj_weight_so_it_stays_unmatched():
    """With query != key, PyTorch splits in_proj_weight into q and kv slices before using them: the
    weight is read by a split, which is no layer; it must get no block rather than a wrong one."""
    model = CrossAttention()
    cm = compile_module(model, torch.randn(2, 5, 16), torch.randn(2, 3, 4))
    assert [layer.name for layer in cm.layers] == ["memory", "attn.out_proj"]
    assert cm.unmatched == ["attn.in_proj_weight", "attn.in_proj_bias"]
    for name, reason in reasons(cm).items():
        assert re.search(r"Split|Slice", reason), (name, reason)
    assert_partition(cm, model)


# --- 5. tied embeddings ---------------------------------------------------------------------------------


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 20)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(self.emb(tokens))))


def test_tied_embedding_is_a_tie_of_the_plan_and_unmatched_with_both_uses_named():
    model = TiedLM()
    cm = compile_module(model, torch.randint(0, 20, (2, 5)))
    assert [summary(layer) for layer in cm.layers] == [
        ("fc", "linear", "fc.weight", "fc.bias", "out_in", 8, 8, 9, 8, 1, 1)
    ]
    assert cm.unmatched == ["emb.weight", "out.bias"]  # for every method but K-FAC (tests/test_tied_table.py)
    ties = [(tie.name, tie.output.weight, tie.output.bias) for tie in cm.plan.ties]
    assert ties == [("emb", "emb.weight", "out.bias")]
    why = reasons(cm)
    assert why["emb.weight"].startswith("tied:") and "Gather" in why["emb.weight"] and "embedding" in why["emb.weight"]
    assert "emb.weight" in why["out.bias"]  # its layer's weight is the tie's
    assert_partition(cm, model)


class Penalised(nn.Module):
    """A weight that is also read outside its layer (a penalty in forward) has an unexplained use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x))) + self.fc.weight.square().sum()


def test_weight_with_another_use_stays_unmatched():
    model = Penalised()
    cm = compile_module(model, torch.randn(3, 8))
    assert [layer.name for layer in cm.layers] == ["head"]
    assert cm.unmatched == ["fc.weight", "fc.bias"]
    why = reasons(cm)
    assert why["fc.weight"].startswith("shared:")
    assert re.search(r"(Mul|Pow) node", why["fc.weight"]), why["fc.weight"]
    assert "fc.weight" in why["fc.bias"]
    assert_partition(cm, model)


# --- einsum and a bias added after a convolution ---------------------------------------------------------


class Einsums(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Parameter(torch.randn(8, 6) / 3)  # [out, in]
        self.eb = nn.Parameter(torch.zeros(8))
        self.f = nn.Parameter(torch.randn(8, 5) / 3)  # [in, out]
        self.g = nn.Parameter(torch.randn(4, 5) / 3)  # [out, in], weight as the first operand
        self.h = nn.Parameter(torch.randn(3, 4) / 3)  # output features not last: no layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.einsum("bsi,oi->bso", x, self.e) + self.eb)
        h = torch.tanh(torch.einsum("...i,io->...o", h, self.f))
        h = torch.tanh(torch.einsum("oi,bsi->bso", self.g, h))
        return torch.einsum("bsi,oi->bos", h, self.h)


def test_einsum_linear_layers():
    model = Einsums()
    cm = compile_module(model, torch.randn(2, 3, 6))
    assert [summary(layer) for layer in cm.layers] == [
        ("e", "linear", "e", "eb", "out_in", 6, 8, 7, 8, 1, 1),
        ("f", "linear", "f", None, "in_out", 8, 5, 8, 5, 1, 1),
        ("g", "linear", "g", None, "out_in", 5, 4, 5, 4, 1, 1),
    ]
    assert cm.plan.layer("e").sites[0].activation == "x"
    assert cm.unmatched == ["h"]
    assert "Einsum" in reasons(cm)["h"]
    assert_partition(cm, model)


class ConvPlusBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.cb = nn.Parameter(torch.zeros(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x) + self.cb.view(1, -1, 1, 1))
        return self.fc(h.mean((2, 3)))


def test_bias_added_after_a_convolution_joins_its_block():
    model = ConvPlusBias()
    cm = compile_module(model, torch.randn(2, 3, 8, 8))
    assert [summary(layer) for layer in cm.layers] == [
        ("conv", "conv2d", "conv.weight", "cb", "out_in", 27, 4, 28, 4, 1, 1),
        ("fc", "linear", "fc.weight", "fc.bias", "out_in", 4, 2, 5, 2, 1, 1),
    ]
    site = cm.plan.layer("conv").sites[0]
    assert values(cm)[site.preactivation].producer().op_type == "Add"
    assert cm.unmatched == []


# --- Transposed convolutions: a block of the convolution each equals ----------------------------------------


class Decoder(nn.Module):
    """ConvTranspose 1-D to 3-D: grouped and dilated with output padding, bias-free, and one whose padding exceeds
    dilation (kernel - 1) (it crops: no convolution equals it)."""

    def __init__(self) -> None:
        super().__init__()
        self.up2 = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2)
        self.up1 = nn.ConvTranspose1d(6, 2, 4, stride=2, padding=1, bias=False)
        self.up3 = nn.ConvTranspose3d(1, 2, (2, 3, 1), stride=(1, 2, 2))
        self.crop = nn.ConvTranspose1d(2, 2, 3, padding=3)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.up2(x)).flatten(2)[:, :, :5]
        h = self.crop(self.up1(h))
        return torch.cat([h.flatten(1), self.up3(v).flatten(1)], 1)


def test_transposed_convolutions_are_blocks_of_the_convolutions_they_equal():
    model = Decoder()
    cm = kronograph.compile(model, example_inputs=(torch.randn(2, 4, 3, 3), torch.randn(2, 1, 2, 3, 2)), loss="mse")
    assert [summary(layer) for layer in cm.layers] == [
        ("up2", "conv2d", "up2.weight", "up2.bias", "transposed", 2 * 9, 3, 19, 3, 2, 1),
        ("up1", "conv1d", "up1.weight", None, "transposed", 6 * 4, 2, 24, 2, 1, 1),
        ("up3", "conv3d", "up3.weight", "up3.bias", "transposed", 6, 2, 7, 2, 1, 1),
    ]
    geometry = cm.plan.layer("up2").geometry  # pads d (k - 1) - p = 3 and 3 - 1 + output_padding = 4
    assert (geometry.stride, geometry.padding, geometry.dilation, geometry.input_dilation) == (
        (1, 1), (3, 3, 4, 4), (2, 2), (2, 2))
    assert reasons(cm).keys() == {"crop.weight", "crop.bias"}
    assert_partition(cm, model)


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm is deprecated")
@pytest.mark.parametrize("style", ["parametrize", "hooks"])
def test_a_parametrized_weight_is_unmatched_with_the_fix(style):
    """Weight norm computes the layer's weight from g and v in the forward (torch.nn.utils.parametrize, or the older
    torch.nn.utils.weight_norm's hook): neither is a layer's weight, and the reason names torch's call that folds
    the weight back, after which the layer has its block."""
    torch.manual_seed(0)
    first = nn.Linear(6, 8)
    if style == "parametrize":
        first = nn.utils.parametrizations.weight_norm(first)
        names, fix = [f"0.parametrizations.weight.original{k}" for k in (0, 1)], "remove_parametrizations(model." \
            "get_submodule('0'), 'weight')"
    else:
        first = nn.utils.weight_norm(first)
        names, fix = ["0.weight_g", "0.weight_v"], "remove_weight_norm(model.get_submodule('0'))"
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(8, 3))
    cm = compile_module(model, torch.randn(2, 6))
    assert all(fix in reasons(cm)[name] for name in names)
    assert fix not in reasons(cm)["0.bias"] and [layer.name for layer in cm.layers] == ["2"]
    if style == "parametrize":
        nn.utils.parametrize.remove_parametrizations(model.get_submodule("0"), "weight")
    else:
        nn.utils.remove_weight_norm(model.get_submodule("0"))
    assert [layer.name for layer in compile_module(model, torch.randn(2, 6)).layers] == ["0", "2"]
