"""The Python contract of kronograph.compile (DESIGN.md): engine, layers, unmatched, state_dict, export_onnx."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import kronograph
from kronograph import KronographError, LayerPlan


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = Net()
    return kronograph.compile(model, example_inputs=(torch.randn(4, 3, 8, 8),), loss="cross_entropy")


def test_contract_on_a_module(compiled):
    assert compiled.engine == "torch"
    assert [(layer.name, layer.kind, layer.weight, layer.bias) for layer in compiled.layers] == [
        ("conv", "conv2d", "conv.weight", "conv.bias"),
        ("head", "linear", "head.weight", "head.bias"),
    ]
    assert compiled.unmatched == ["bn.weight", "bn.bias"]


def test_state_dict_shares_the_module_parameters(compiled):
    state = compiled.state_dict()
    assert set(state) == set(compiled.module.state_dict())
    with torch.no_grad():
        compiled.module.head.weight.add_(1.0)
    assert torch.equal(compiled.state_dict()["head.weight"], compiled.module.head.weight)


def test_compile_leaves_the_module_unchanged():
    torch.manual_seed(0)
    model = Net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kronograph.compile(model, example_inputs=torch.randn(4, 3, 8, 8))
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_export_onnx_serves_the_current_weights(compiled, tmp_path):
    model = compiled.module
    path = compiled.export_onnx(tmp_path / "net.onnx")
    assert model.training  # the export is in eval mode and restores the mode
    x = torch.randn(7, 3, 8, 8)  # another batch size than the example: the batch axis is dynamic
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    model.train()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_onnx_round_trip(compiled, tmp_path):
    path = compiled.export_onnx(tmp_path / "net.onnx")
    again = kronograph.compile(str(path), loss="cross_entropy")
    assert again.engine == "onnxruntime"
    assert [layer.kind for layer in again.layers] == ["conv2d", "linear"]
    state = again.state_dict()
    # In inference mode the exporter may fold batch norm into the convolution, so only the head is compared.
    np.testing.assert_allclose(state["head.weight"].numpy(), compiled.module.head.weight.detach().numpy())
    assert again.export_onnx(tmp_path / "copy.onnx").is_file()


def test_plan_json_round_trip(compiled):
    plan = compiled.plan
    assert LayerPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kronograph.compile(Net()), "example_inputs"),
        (lambda: kronograph.compile(Net(), torch.randn(2, 3, 8, 8), loss="hinge"), "unknown loss"),
        (lambda: kronograph.compile(Net(), torch.randn(2, 3), loss="mse"), "could not trace"),
        (lambda: kronograph.compile("missing.onnx"), "not found"),
        (lambda: kronograph.compile(Net(), torch.randn(2, 3, 8, 8), engine="tpu"), "unknown engine"),
        (lambda: kronograph.compile(42), "cannot compile"),
    ],
)
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(KronographError, match=message):
        call()


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00\x01 not a protobuf")
    with pytest.raises(KronographError, match="not a readable ONNX model|holds no ONNX graph"):
        kronograph.compile(str(path))


def test_frozen_parameters_are_not_in_the_plan():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    plan = kronograph.compile(model, torch.randn(2, 3)).plan
    assert [layer.name for layer in plan.layers] == ["2"]
    assert plan.parameters == ("2.weight", "2.bias")
    assert plan.unmatched == ()


def test_exported_file_keeps_every_parameter_even_all_zero_ones(tmp_path):
    """A file trained further (kronograph train model.onnx) needs every parameter: the exporter's optimiser
    would fold an all-zero bias out of its Gemm."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    torch.nn.init.zeros_(model[0].bias)
    cm = kronograph.compile(model, example_inputs=(torch.randn(3, 4),))
    again = kronograph.compile(str(cm.export_onnx(tmp_path / "net.onnx")))
    assert set(again.plan.parameters) == {name for name, _ in model.named_parameters()}
    assert all(layer.bias for layer in again.layers)


class Chatty(nn.Module):
    """Logs what torch's exporter logs where torchvision is absent (four such lines per export, issue 11)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import logging

        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(x, FakeTensor):  # while the exporter traces, as its own line is logged then
            logging.getLogger("torch.onnx._internal.exporter._registration").warning(
                "torchvision is not installed. Skipping %s", "torchvision::nms")
        return self.layer(x)


def test_the_exporters_log_lines_do_not_reach_the_user(caplog, capfd):
    import logging

    with caplog.at_level(logging.INFO):
        kronograph.compile(Chatty(), example_inputs=(torch.randn(2, 3),))
    assert not [record for record in caplog.records if "torchvision" in record.getMessage()]
    out, err = capfd.readouterr()
    assert "torchvision" not in out + err
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    assert logger.getEffectiveLevel() < logging.CRITICAL  # the loggers' levels are put back afterwards


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) if x.sum() > 0 else -self.layer(x)


def test_a_branch_on_tensor_values_gets_the_fix_and_no_graph_dump(capfd):
    with pytest.raises(KronographError, match="branches on the values of a tensor.*torch.where or torch.cond"):
        kronograph.compile(ValueBranch(), example_inputs=(torch.randn(4, 3),))
    out, err = capfd.readouterr()
    assert "def forward" not in out + err and "Unable to find user code" not in out + err


class Seq2Seq(nn.Module):
    """nn.Transformer with a causal target mask; told so or not (``causal``)."""

    def __init__(self, causal: bool | None) -> None:
        super().__init__()
        self.causal = causal
        self.embed, self.out = nn.Embedding(20, 8), nn.Linear(8, 20)
        self.body = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(target.shape[1])
        return self.out(self.body(self.embed(source), self.embed(target), tgt_mask=mask, tgt_is_causal=self.causal))


def test_nn_transformers_mask_check_is_named_with_its_flag():
    """Not told whether tgt_mask is causal, nn.Transformer compares it with a causal mask (a branch on its
    values): the error names the flag, with which the model compiles."""
    tokens = torch.randint(0, 20, (2, 10), generator=torch.Generator().manual_seed(0))
    with pytest.raises(KronographError, match="branches on the values.*nn.Transformer's own check.*tgt_is_causal=True"):
        kronograph.compile(Seq2Seq(None), example_inputs=(tokens[:, :5], tokens[:, 5:]), loss="cross_entropy")
    cm = kronograph.compile(Seq2Seq(True), example_inputs=(tokens[:, :5], tokens[:, 5:]), loss="cross_entropy")
    assert "out" in [layer.name for layer in cm.plan.layers]


class PackedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(packed)[1][-1])


def test_packed_sequences_get_the_reason_and_the_fix():
    """torch.export cannot trace pack_padded_sequence (its batch sizes are the lengths' values): the error says
    so and how to write the model instead, and the weights are left as they were."""
    torch.manual_seed(0)
    model = PackedGRU()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KronographError, match="packs its sequences.*padded batch.*lengths - 1"):
        kronograph.compile(model, example_inputs=(torch.randn(3, 5, 3), torch.tensor([5, 2, 4])))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_exports_reuse_one_onnx_registry_with_the_graph_torchs_own_gives(monkeypatch):
    """compiler/export.py builds torch.onnx's function registry once per process (torch builds it for every
    export): the graph is the one torch's own registry gives, torch's classmethod is back after each export, and
    an export that adds to its copy leaves the next one's alone."""
    import contextlib

    import onnx_ir as ir

    from kronograph.compiler import export

    found = export._onnx_registry()
    if found is None:
        pytest.skip("this torch's onnx registry has another layout: every export builds its own, as torch's does")
    registry_class, build, _ = found
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(2, 4)
    reused = [ir.to_proto(kronograph.compile(model, (x,)).graph).SerializeToString() for _ in range(2)]
    assert registry_class.__dict__["from_torchlib"] is build
    monkeypatch.setattr(export, "_reused_registry", contextlib.nullcontext)
    own = ir.to_proto(kronograph.compile(model, (x,)).graph).SerializeToString()
    assert reused[0] == reused[1] == own
    with export._reused_registry():
        first, second = registry_class.from_torchlib(), registry_class.from_torchlib()
    target = next(iter(first.functions))
    first.functions[target].clear()
    assert second.functions[target] and first.functions is not second.functions


class SingleHeadAttention(nn.Module):
    """F.scaled_dot_product_attention on [batch, T, d] (no heads axis), which torch.onnx writes only as 4-D."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.qkv, self.out = nn.Embedding(20, 8), nn.Linear(8, 24), nn.Linear(8, 20)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.emb(tokens)).chunk(3, -1)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_attention_on_3d_tensors_compiles_to_a_graph_that_computes_the_models_outputs(tmp_path):
    import onnxruntime

    from kronograph.compiler.export import write_graph

    torch.manual_seed(0)
    model = SingleHeadAttention()
    tokens = torch.randint(0, 20, (3, 7))
    cm = kronograph.compile(model, tokens, loss="cross_entropy")
    assert [layer.name for layer in cm.layers] == ["emb", "qkv", "out"]
    session = onnxruntime.InferenceSession(str(write_graph(cm.graph, tmp_path / "attention.onnx")))
    found, = session.run(None, {session.get_inputs()[0].name: tokens.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(found, model(tokens).numpy(), rtol=1e-5, atol=1e-6)
