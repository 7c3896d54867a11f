"""passes/instrument: the taps of the training model reproduce onnxruntime-training's own weight gradients.

For every layer: dL/dW_bar = (1/n) sum_i sum_t g_it a_bar_it^T with g = per_example_gradient(gradient tap)
(DESIGN.md's per-example g) and a_bar the activation tap with its homogeneous 1; the left side is read
from onnxruntime-training's checkpoint state after one train_step, never recomputed by us.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import kronograph
from kronograph.errors import KronographError
from kronograph.passes.instrument import TrainingArtifacts, instrument, per_example_gradient, tap_names
from kronograph.passes.plan import Layer
from kronograph.runtime.losses import get_loss

pytest.importorskip("onnxruntime.training")
import onnxruntime  # noqa: E402
from onnxruntime.training.api import CheckpointState, Module  # noqa: E402

RTOL = 1e-5
ATOL = 1e-6


def train_step(cm, loss: str, x: np.ndarray, y: np.ndarray, out_dir: Path):
    """One onnxruntime-training step: (artifacts, {output name: array}, {parameter: ORT gradient})."""
    art = instrument(cm.graph, cm.plan, loss, out_dir)
    state = CheckpointState.load_checkpoint(str(art.checkpoint))
    module = Module(str(art.training_model), state, str(art.eval_model))
    assert module.input_names() == list(art.inputs)
    assert module.output_names() == list(art.outputs)
    module.train()
    module.lazy_reset_grad()
    fetched = module(x, y)
    outputs = dict(zip(art.outputs, fetched, strict=True))
    grads = {name: np.array(state.parameters[name].grad) for name in art.trainable}
    return art, outputs, grads


def recomputed_gradient(layer: Layer, art: TrainingArtifacts, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """(1/n) sum over examples (and positions) of g a_bar^T, pooled over the layer's sites: [out, a_dim]."""
    total = 0.0
    for k, site in enumerate(layer.sites):
        a_name, g_name = art.taps[(layer.name, k)]
        a = torch.from_numpy(outputs[a_name]).double()
        gradient = outputs[g_name]
        n = gradient.shape[0]
        g = torch.from_numpy(per_example_gradient(gradient)).double()
        if layer.geometry is None:
            if site.activation_transposed:
                a = a.T
            a = a.reshape(-1, layer.in_features)
            g = g.reshape(-1, layer.out_features)
            if layer.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
            total = total + g.T @ a / n
        else:
            geo = layer.geometry
            assert geo.groups == 1
            spatial = len(geo.kernel)
            begins, ends = geo.padding[:spatial], geo.padding[spatial:]
            pad = [p for b, e in zip(reversed(begins), reversed(ends), strict=True) for p in (b, e)]
            patches = F.unfold(F.pad(a, pad), geo.kernel, dilation=geo.dilation, stride=geo.stride)  # [n, in, L]
            g = g.reshape(n, layer.out_features, -1)  # [n, out, L]
            assert g.shape[-1] == patches.shape[-1]
            if layer.bias is not None:
                patches = torch.cat([patches, torch.ones(n, 1, patches.shape[-1], dtype=a.dtype)], dim=1)
            total = total + torch.einsum("nol,nil->oi", g, patches) / n
    return total.numpy()


def ort_gradient(layer: Layer, grads: dict[str, np.ndarray]) -> np.ndarray:
    """onnxruntime's gradient of W_bar = [W b] in [out, in] order."""
    weight = grads[layer.weight]
    weight = weight.T if layer.weight_layout == "in_out" else weight.reshape(weight.shape[0], -1)
    if layer.bias is None:
        return weight
    return np.concatenate([weight, grads[layer.bias].reshape(-1, 1)], axis=1)


def check_identity(cm, art, outputs, grads) -> None:
    assert cm.plan.layers
    for layer in cm.plan.layers:
        expected = ort_gradient(layer, grads)
        assert np.abs(expected).max() > 1e-4, f"{layer.name}: a vanishing gradient tests nothing"
        np.testing.assert_allclose(
            recomputed_gradient(layer, art, outputs), expected, rtol=RTOL, atol=ATOL, err_msg=layer.name
        )


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.head = nn.Parameter(torch.randn(4, 8) * 0.5)

    def forward(self, x):
        return F.linear(torch.tanh(self.fc1(x)), self.head)  # functional linear, no bias


def test_tap_names_are_returned_by_module():
    torch.manual_seed(0)
    cm = kronograph.compile(MLP(), example_inputs=(torch.randn(5, 6),), loss="cross_entropy")
    taps = tap_names(cm.plan)
    assert set(taps) == {("fc1", 0), ("head", 0)}
    assert taps[("fc1", 0)] == ("kronograph.a.fc1.0", "kronograph.g.fc1.0")
    names = [name for pair in taps.values() for name in pair]
    assert len(set(names)) == len(names)
    assert not any(name.endswith("_grad") for name in names)


def test_mlp_cross_entropy(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(5, 6)
    y = torch.tensor([0, 3, 1, 2, 3])
    cm = kronograph.compile(model, example_inputs=(x,), loss="cross_entropy")
    assert [layer.name for layer in cm.plan.layers] == ["fc1", "head"]
    art, outputs, grads = train_step(cm, "cross_entropy", x.numpy(), y.numpy(), tmp_path)
    assert art.outputs[:2] == (art.loss_output, "kronograph.output") and art.model_output == "kronograph.output"
    assert art.eval_outputs[1] == art.model_output
    check_identity(cm, art, outputs, grads)

    # onnxruntime's loss and gradients are PyTorch's (mean cross-entropy over the batch) ...
    logits = model(x)
    reference = F.cross_entropy(logits, y)
    reference.backward()
    np.testing.assert_allclose(outputs[art.loss_output], reference.item(), rtol=RTOL)
    for name, param in model.named_parameters():
        np.testing.assert_allclose(grads[name], param.grad.numpy(), rtol=RTOL, atol=ATOL, err_msg=name)
    # ... and the per-example g of the last layer is softmax - onehot (dl_i/ds_i, not scaled by 1/n).
    g = per_example_gradient(outputs[art.taps[("head", 0)][1]])
    expected = torch.softmax(logits, -1) - F.one_hot(y, 4).float()
    np.testing.assert_allclose(g, expected.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(outputs[art.taps[("fc1", 0)][0]], x.numpy())
    np.testing.assert_allclose(outputs[art.model_output], logits.detach().numpy(), rtol=RTOL, atol=ATOL)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_cnn_cross_entropy(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(4, 2, 8, 8)
    y = np.array([0, 4, 2, 1], dtype=np.int64)
    cm = kronograph.compile(CNN(), example_inputs=(x[:2],), loss="cross_entropy")  # batch stays symbolic
    conv = cm.plan.layer("conv")
    assert conv.kind == "conv2d" and conv.geometry.stride == (2, 2) and conv.geometry.padding == (1, 1, 1, 1)
    art, outputs, grads = train_step(cm, "cross_entropy", x.numpy(), y, tmp_path)
    assert outputs[art.taps[("conv", 0)][1]].shape == (4, 3, 4, 4)
    check_identity(cm, art, outputs, grads)


def test_batch_norm_trains_with_batch_statistics(tmp_path):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    x = torch.randn(4, 2, 4, 4)
    y = torch.tensor([0, 1, 1, 0])
    cm = kronograph.compile(model, example_inputs=(x,), loss="cross_entropy")
    with torch.no_grad():
        eval_loss = F.cross_entropy(copy.deepcopy(model).eval()(x), y).item()  # before the stats move
    art, outputs, grads = train_step(cm, "cross_entropy", x.numpy(), y.numpy(), tmp_path)
    check_identity(cm, art, outputs, grads)
    reference = F.cross_entropy(model(x), y)  # training mode: batch statistics, as on onnxruntime
    reference.backward()
    np.testing.assert_allclose(outputs[art.loss_output], reference.item(), rtol=RTOL)
    for name, param in model.named_parameters():
        np.testing.assert_allclose(grads[name], param.grad.numpy(), rtol=1e-4, atol=ATOL, err_msg=name)
    # The eval model loads (one BatchNormalization output) and normalises with the stored running statistics.
    module = Module(str(art.training_model), CheckpointState.load_checkpoint(str(art.checkpoint)), str(art.eval_model))
    module.eval()
    assert module.output_names() == list(art.eval_outputs)
    evaluated = module(x.numpy(), y.numpy())
    np.testing.assert_allclose(evaluated[0], eval_loss, rtol=RTOL)


def test_layer_norm_gets_its_statistics_outputs(tmp_path):
    """LayerNormalization as exporters write it (one output) has no gradient in onnxruntime-training until it
    gets its Mean and InvStdDev outputs; its weight and bias train (unmatched) and the taps stay exact."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(5, 6), np.array([0, 2, 1, 1, 0])
    cm = kronograph.compile(model, example_inputs=(x,), loss="cross_entropy")
    art, outputs, grads = train_step(cm, "cross_entropy", x.numpy(), y, tmp_path)
    check_identity(cm, art, outputs, grads)
    torch.nn.functional.cross_entropy(model(x), torch.from_numpy(y)).backward()
    for name in ("1.weight", "1.bias"):
        np.testing.assert_allclose(grads[name], dict(model.named_parameters())[name].grad.numpy(), rtol=1e-4, atol=1e-6)


def test_dropout_gets_its_mask(tmp_path):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    x = torch.randn(8, 6)
    cm = kronograph.compile(model, example_inputs=(x,), loss="cross_entropy")
    art, outputs, grads = train_step(cm, "cross_entropy", x.numpy(), np.arange(8) % 3, tmp_path)
    check_identity(cm, art, outputs, grads)
    tapped = outputs[art.taps[("3", 0)][0]]  # the activation after the random mask, kept entries doubled
    hidden = torch.relu(model[0](x)).detach().numpy()
    kept = tapped != 0
    np.testing.assert_allclose(tapped[kept], 2 * hidden[kept], rtol=RTOL)
    assert (~kept & (hidden > 0)).any() and (kept & (hidden > 0)).any()
    module = Module(str(art.training_model), CheckpointState.load_checkpoint(str(art.checkpoint)), str(art.eval_model))
    module.eval()
    assert np.isfinite(module(x.numpy(), np.arange(8) % 3)[0])


class Sequence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def test_sequence_mse(tmp_path):
    torch.manual_seed(2)
    model = Sequence()
    x = torch.randn(3, 7, 5)
    target = torch.randn(3, 7, 3)
    cm = kronograph.compile(model, example_inputs=(x,), loss="mse")
    assert {layer.name for layer in cm.plan.layers} == {"proj", "out"}
    art, outputs, grads = train_step(cm, "mse", x.numpy(), target.numpy(), tmp_path)
    assert outputs[art.taps[("proj", 0)][0]].shape == (3, 7, 5)
    check_identity(cm, art, outputs, grads)
    # mse's l_i is half the sum of squares over example i's 7 x 3 elements, so g_i = s_i - t_i.
    s = model(x).detach()
    g = per_example_gradient(outputs[art.taps[("out", 0)][1]])
    np.testing.assert_allclose(g, (s - target).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(outputs[art.loss_output], get_loss("mse")(s, target).item(), rtol=RTOL)
    np.testing.assert_allclose(outputs[art.model_output], s.numpy(), rtol=RTOL, atol=ATOL)


def test_sequence_cross_entropy_puts_classes_on_axis_1(tmp_path):
    torch.manual_seed(3)
    model = Sequence()
    x = torch.randn(2, 4, 5)
    y = torch.randint(0, 3, (2, 4))
    cm = kronograph.compile(model, example_inputs=(x,), loss="cross_entropy")
    art, outputs, grads = train_step(cm, "cross_entropy", x.numpy(), y.numpy(), tmp_path)
    check_identity(cm, art, outputs, grads)
    reference = F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1))
    reference.backward()
    np.testing.assert_allclose(outputs[art.loss_output], reference.item(), rtol=RTOL)
    np.testing.assert_allclose(grads["out.weight"], model.out.weight.grad.numpy(), rtol=RTOL, atol=ATOL)


def test_sigmoid_cross_entropy(tmp_path):
    torch.manual_seed(4)
    model = MLP()
    x = torch.randn(5, 6)
    target = torch.rand(5, 4)
    cm = kronograph.compile(model, example_inputs=(x,), loss="sigmoid_cross_entropy")
    art, outputs, grads = train_step(cm, "sigmoid_cross_entropy", x.numpy(), target.numpy(), tmp_path)
    check_identity(cm, art, outputs, grads)
    s = model(x)
    reference = get_loss("sigmoid_cross_entropy")(s, target)  # summed over the 4 outputs, mean over examples
    reference.backward()
    np.testing.assert_allclose(outputs[art.loss_output], reference.item(), rtol=RTOL)
    np.testing.assert_allclose(grads["fc1.weight"], model.fc1.weight.grad.numpy(), rtol=RTOL, atol=ATOL)
    g = per_example_gradient(outputs[art.taps[("head", 0)][1]])
    np.testing.assert_allclose(g, (torch.sigmoid(s) - target).detach().numpy(), rtol=RTOL, atol=ATOL)


def _matmul_add_model(path: Path) -> None:
    """A graph as TensorFlow/JAX converters write it: MatMul with [in, out] weights, then Add of the bias."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32) * 0.5, "dense/kernel"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "dense/bias"),
        numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32) * 0.5, "logits/kernel"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32) * 0.1, "logits/bias"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "dense/kernel"], ["dense/MatMul:0"], name="dense/MatMul"),
        helper.make_node("Add", ["dense/MatMul:0", "dense/bias"], ["dense/BiasAdd:0"], name="dense/BiasAdd"),
        helper.make_node("Relu", ["dense/BiasAdd:0"], ["dense/Relu:0"], name="dense/Relu"),
        helper.make_node("MatMul", ["dense/Relu:0", "logits/kernel"], ["logits/MatMul:0"], name="logits/MatMul"),
        helper.make_node("Add", ["logits/MatMul:0", "logits/bias"], ["y"], name="logits/BiasAdd"),
    ]
    graph = helper.make_graph(
        nodes,
        "tf_style",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tf2onnx")
    model.ir_version = 7
    onnx.save(model, str(path))


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_onnx_file_with_in_out_weights(tmp_path, loss):
    path = tmp_path / "tf_style.onnx"
    _matmul_add_model(path)
    cm = kronograph.compile(str(path), loss=loss)
    layers = {layer.name: layer for layer in cm.plan.layers}
    assert set(layers) == {"dense", "logits"}
    assert all(layer.weight_layout == "in_out" and layer.bias for layer in layers.values())
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    y = rng.standard_normal((5, 3)).astype(np.float32) if loss == "mse" else np.array([0, 2, 1, 1, 0])
    art, outputs, grads = train_step(cm, loss, x, y, tmp_path / "artifacts")
    assert art.inputs == ("x", "labels")
    check_identity(cm, art, outputs, grads)


def test_forward_model_takes_the_weights_as_inputs(tmp_path):
    """forward_model.onnx: data inputs, then every trainable parameter as an input; the model output only."""
    path = tmp_path / "tf_style.onnx"
    _matmul_add_model(path)
    cm = kronograph.compile(str(path), loss="mse")
    art = instrument(cm.graph, cm.plan, "mse", tmp_path / "artifacts")
    assert art.forward_model == tmp_path / "artifacts" / "forward_model.onnx"
    model = onnx.load(str(art.forward_model))
    onnx.checker.check_model(model)
    assert model.ir_version <= 10
    inputs = {v.name: v for v in model.graph.input}
    assert list(inputs) == ["x", *art.trainable]
    assert {i.name for i in model.graph.initializer}.isdisjoint(art.trainable)
    assert [o.name for o in model.graph.output] == ["y"]
    assert [d.dim_value for d in inputs["dense/kernel"].type.tensor_type.shape.dim] == [6, 8]
    original = onnx.load(str(path))
    weights = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    x = np.random.default_rng(7).standard_normal((3, 6)).astype(np.float32)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    run = onnxruntime.InferenceSession(str(art.forward_model), options, providers=["CPUExecutionProvider"])
    feed = {"x": x, **{name: weights[name] for name in art.trainable}}
    expected = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run.run(None, feed)[0], expected, rtol=1e-6)


def test_model_output_name_is_reserved(tmp_path):
    path = tmp_path / "clash.onnx"
    _matmul_add_model(path)
    model = onnx.load(str(path))
    model.graph.node[-1].output[0] = "kronograph.output"
    model.graph.output[0].name = "kronograph.output"
    onnx.save(model, str(path))
    cm = kronograph.compile(str(path), loss="mse")
    with pytest.raises(KronographError, match="kronograph.output"):
        instrument(cm.graph, cm.plan, "mse", tmp_path / "artifacts")


def test_per_example_gradient_scales_by_batch():
    tap = np.ones((4, 3), dtype=np.float32)
    assert per_example_gradient(tap).dtype == np.float32
    np.testing.assert_array_equal(per_example_gradient(tap), 4 * tap)
    np.testing.assert_array_equal(per_example_gradient(tap, batch_size=2), 2 * tap)


def test_bad_arguments(tmp_path):
    torch.manual_seed(0)
    cm = kronograph.compile(MLP(), example_inputs=(torch.randn(2, 6),), loss="cross_entropy")
    with pytest.raises(KronographError, match="unknown loss"):
        instrument(cm.graph, cm.plan, "hinge", tmp_path)
    with pytest.raises(KronographError, match="optimizer"):
        instrument(cm.graph, cm.plan, "mse", tmp_path, optimizer="lbfgs")
    with pytest.raises(KronographError, match="label_name"):
        instrument(cm.graph, cm.plan, "mse", tmp_path, label_name="x")


@pytest.mark.parametrize(
    "split, keepdims, positions",
    [(np.array(2, dtype=np.int64), 1, [0, 2, -1]),  # pieces of 2 along 5: 2, 2, 1
     (np.array([1, 3, 1], dtype=np.int64), 1, [1, -3]),
     (None, 0, [4, 0])],  # pieces of one, squeezed
)
def test_sequence_splits_become_a_split_with_the_same_outputs(split, keepdims, positions):
    """SplitToSequence read by SequenceAt at constant positions (torch.export's chunk) becomes Split + Identity
    (Squeeze where the pieces drop the axis); onnxruntime gives the same outputs before and after, and no
    sequence op is left for onnxruntime-training's gradient builder to refuse."""
    from kronograph.passes.training_forms import sequence_splits_as_split

    inputs = ["x"] + (["split"] if split is not None else [])
    nodes = [helper.make_node("SplitToSequence", inputs, ["seq"], axis=1, keepdims=keepdims)]
    outputs = []
    for k, position in enumerate(positions):
        nodes.append(helper.make_node("Constant", [], [f"p{k}"], value=numpy_helper.from_array(np.array(position))))
        nodes.append(helper.make_node("SequenceAt", ["seq", f"p{k}"], [f"y{k}"]))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None))
    initializers = [numpy_helper.from_array(split, "split")] if split is not None else []
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])], outputs,
                              initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = np.arange(15, dtype=np.float32).reshape(3, 5)
    before = onnxruntime.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    sequence_splits_as_split(proto)
    assert not {n.op_type for n in proto.graph.node} & {"SplitToSequence", "SequenceAt"}
    after = onnxruntime.InferenceSession(proto.SerializeToString()).run(None, {"x": x})
    for want, got in zip(before, after):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("reader", ["SequenceLength", "an If body"])
def test_a_sequence_read_otherwise_is_left_as_it_is(reader):
    from kronograph.passes.training_forms import sequence_splits_as_split

    zero = helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0)))
    nodes = [helper.make_node("SplitToSequence", ["x"], ["seq"], axis=1), zero,
             helper.make_node("SequenceAt", ["seq", "zero"], ["first"])]
    if reader == "SequenceLength":
        nodes.append(helper.make_node("SequenceLength", ["seq"], ["n"]))
    else:  # a branch that reads the outer sequence: rewriting it away would leave the body's input dangling
        branch = helper.make_graph([helper.make_node("SequenceLength", ["seq"], ["m"])], "b", [],
                                   [helper.make_tensor_value_info("m", TensorProto.INT64, [])])
        nodes += [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
                  helper.make_node("If", ["c"], ["n"], then_branch=branch, else_branch=branch)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])],
                              [helper.make_tensor_value_info("n", TensorProto.INT64, []),
                               helper.make_tensor_value_info("first", TensorProto.FLOAT, [3, 1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    expected = proto.SerializeToString()
    sequence_splits_as_split(proto)
    assert proto.SerializeToString() == expected
