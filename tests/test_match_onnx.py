"""The LayerPlan of ONNX files written the way other frameworks write them (built with onnx.helper)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kronograph

from plan_helpers import reasons, summary

RNG = np.random.default_rng(0)


def init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def const(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def tensor(name: str, *shape: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def save(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto],
    opset: int = 17,
    ir_version: int = 8,
) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def compile_file(path: Path) -> kronograph.CompiledModel:
    return kronograph.compile(str(path), loss="mse")


# --- MatMul with [in, out] weights (TensorFlow / Keras style) and Gemm in every orientation -----------------


@pytest.fixture(scope="module")
def dense_file(tmp_path_factory) -> Path:
    """x -> MatMul(kernel [8, 16]) + bias -> Relu -> Gemm(transB=0) -> Relu -> Gemm(transB=1) -> Transpose
    -> Gemm(transA=1), then a second MatMul whose Add has the bias as its first input."""
    nodes = [
        helper.make_node("MatMul", ["x", "dense/kernel:0"], ["mm"]),
        helper.make_node("Add", ["mm", "dense/bias:0"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "W2"], ["h2"], transB=0),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "W3", "b3"], ["h3"], transB=1),
        helper.make_node("Transpose", ["h3"], ["h3t"], perm=[1, 0]),
        helper.make_node("Gemm", ["h3t", "W4", "b4"], ["h4"], transA=1),
        helper.make_node("MatMul", ["h4", "dense_1/kernel:0"], ["mm5"]),
        helper.make_node("Add", ["dense_1/bias:0", "mm5"], ["y"]),
    ]
    initializers = [
        init("dense/kernel:0", 8, 16),
        init("dense/bias:0", 16),
        init("W2", 16, 12),
        init("W3", 6, 12),
        init("b3", 6),
        init("W4", 6, 3),
        init("b4", 1, 3),
        init("dense_1/kernel:0", 3, 2),
        init("dense_1/bias:0", 2),
    ]
    path = tmp_path_factory.mktemp("onnx") / "dense.onnx"
    return save(path, nodes, [tensor("x", "N", 8)], [tensor("y", "N", 2)], initializers)


def test_matmul_and_gemm_layers(dense_file):
    cm = compile_file(dense_file)
    assert cm.engine == "onnxruntime"
    assert [summary(layer) for layer in cm.layers] == [
        ("dense", "linear", "dense/kernel:0", "dense/bias:0", "in_out", 8, 16, 9, 16, 1, 1),
        ("W2", "linear", "W2", None, "in_out", 16, 12, 16, 12, 1, 1),
        ("W3", "linear", "W3", "b3", "out_in", 12, 6, 13, 6, 1, 1),
        ("W4", "linear", "W4", "b4", "in_out", 6, 3, 7, 3, 1, 1),
        ("dense_1", "linear", "dense_1/kernel:0", "dense_1/bias:0", "in_out", 3, 2, 4, 2, 1, 1),
    ]
    assert cm.unmatched == []
    assert cm.plan.inputs == ("x",) and cm.plan.outputs == ("y",)


def test_sites_of_the_dense_file(dense_file):
    cm = compile_file(dense_file)
    sites = {layer.name: layer.sites[0] for layer in cm.layers}
    assert (sites["dense"].activation, sites["dense"].preactivation) == ("x", "h1")
    assert (sites["W2"].activation, sites["W2"].preactivation) == ("r1", "h2")
    assert (sites["W3"].activation, sites["W3"].preactivation) == ("r2", "h3")
    assert (sites["W4"].activation, sites["W4"].preactivation) == ("h3t", "h4")
    assert (sites["dense_1"].activation, sites["dense_1"].preactivation) == ("h4", "y")
    assert sites["W4"].activation_transposed  # Gemm transA=1: the tensor holds a^T, [in, batch]
    assert not any(site.activation_transposed for name, site in sites.items() if name != "W4")
    assert all(site.module == "" and site.call == "" for site in sites.values())


# --- convolutions with their own initializer names ---------------------------------------------------------


@pytest.fixture(scope="module")
def conv_file(tmp_path_factory) -> Path:
    """Conv without bias; Conv + Add(bias reshaped to [1, C, 1, 1]) as converters emit it; a Conv followed
    by an Add of a [C] vector, which broadcasts along the last (width) axis and so is not a bias."""
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2_w"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], group=2),
        helper.make_node("Reshape", ["conv2_b", "bias_shape"], ["conv2_b4"]),
        helper.make_node("Add", ["c2", "conv2_b4"], ["s2"]),
        helper.make_node("Relu", ["s2"], ["r2"]),
        helper.make_node("Conv", ["r2", "conv3_w"], ["c3"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["c3", "row"], ["y"]),
    ]
    initializers = [
        init("conv_w", 4, 2, 3, 3),
        init("conv2_w", 4, 2, 3, 3),
        init("conv2_b", 4),
        const("bias_shape", [1, 4, 1, 1]),
        init("conv3_w", 3, 4, 1, 1),
        init("row", 3),  # y is [1, 3, 3, 3]: a [3] vector would run along the width
    ]
    path = tmp_path_factory.mktemp("onnx") / "conv.onnx"
    return save(path, nodes, [tensor("x", 1, 2, 8, 8)], [tensor("y", 1, 3, 3, 3)], initializers)


def test_conv_layers(conv_file):
    cm = compile_file(conv_file)
    assert [summary(layer) for layer in cm.layers] == [
        ("conv_w", "conv2d", "conv_w", None, "out_in", 18, 4, 18, 4, 1, 1),
        ("conv2_w", "conv2d", "conv2_w", "conv2_b", "out_in", 18, 2, 19, 2, 2, 1),
        ("conv3_w", "conv2d", "conv3_w", None, "out_in", 4, 3, 4, 3, 1, 1),
    ]
    conv2 = cm.plan.layer("conv2_w")
    assert (conv2.sites[0].activation, conv2.sites[0].preactivation) == ("r1", "s2")
    assert conv2.geometry.stride == (2, 2) and conv2.geometry.padding == (0, 0, 0, 0)
    assert cm.unmatched == ["row"]
    assert "Add" in reasons(cm)["row"]
    assert "bias_shape" not in cm.plan.parameters  # an int64 constant is no parameter


def test_reshaped_bias_with_a_second_reader_is_not_taken(tmp_path):
    """The bias's Reshape also feeds a graph output: the coverage check would not see that use behind
    the Reshape, so the bias is left out of the block instead."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("Reshape", ["b", "bias_shape"], ["b4"]),
        helper.make_node("Add", ["c", "b4"], ["y"]),
        helper.make_node("Mul", ["b4", "b4"], ["z"]),
    ]
    path = save(
        tmp_path / "shared_bias.onnx",
        nodes,
        [tensor("x", 1, 2, 5, 5)],
        [tensor("y", 1, 4, 3, 3), tensor("z", 1, 4, 1, 1)],
        [init("w", 4, 2, 3, 3), init("b", 4), const("bias_shape", [1, 4, 1, 1])],
    )
    cm = compile_file(path)
    assert [summary(layer) for layer in cm.layers] == [("w", "conv2d", "w", None, "out_in", 18, 4, 18, 4, 1, 1)]
    assert cm.unmatched == ["b"]
    assert "Reshape" in reasons(cm)["b"]


# --- old files, constants, weight sharing and extra uses ---------------------------------------------------


@pytest.fixture(scope="module")
def old_file(tmp_path_factory) -> Path:
    """IR version 3 / opset 9: every initializer is also declared as a graph input. A one-element
    initializer (a scale) is a constant, not a parameter."""
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fcW", "fcB"], ["g"], transB=1),
        helper.make_node("Mul", ["g", "scale"], ["y"]),
    ]
    initializers = [init("conv_w", 4, 2, 3, 3), init("conv_b", 4), init("fcW", 5, 64), init("fcB", 5), init("scale", 1)]
    inputs = [tensor("x", 1, 2, 4, 4)] + [tensor(t.name, *t.dims) for t in initializers]
    path = tmp_path_factory.mktemp("onnx") / "old.onnx"
    return save(path, nodes, inputs, [tensor("y", 1, 5)], initializers, opset=9, ir_version=3)


def test_old_file_lists_only_data_inputs(old_file):
    assert len(onnx.load(str(old_file)).graph.input) == 6  # the file itself lists every initializer
    cm = compile_file(old_file)
    assert cm.plan.inputs == ("x",)
    assert cm.plan.outputs == ("y",)
    assert [summary(layer) for layer in cm.layers] == [
        ("conv_w", "conv2d", "conv_w", "conv_b", "out_in", 18, 4, 19, 4, 1, 1),
        ("fcW", "linear", "fcW", "fcB", "out_in", 64, 5, 65, 5, 1, 1),
    ]


def test_single_element_initializer_is_a_constant(old_file):
    cm = compile_file(old_file)
    assert cm.plan.parameters == ("conv_w", "conv_b", "fcW", "fcB")
    assert "scale" not in cm.unmatched
    assert all("scale" not in (layer.weight, layer.bias) for layer in cm.layers)


def test_shared_weight_and_extra_uses(tmp_path):
    """W feeds two MatMuls (one layer, two sites); V feeds a MatMul and a Mul (no block, reason names
    the Mul); a Gemm with beta != 1 scales its C, which is then no plain bias."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"]),
        helper.make_node("Tanh", ["a"], ["ta"]),
        helper.make_node("MatMul", ["ta", "W"], ["b"]),
        helper.make_node("MatMul", ["b", "V"], ["c"]),
        helper.make_node("Mul", ["V", "V"], ["vv"]),
        helper.make_node("Gemm", ["c", "U", "ub"], ["y"], beta=0.5),
    ]
    path = save(
        tmp_path / "shared.onnx",
        nodes,
        [tensor("x", "N", 6)],
        [tensor("y", "N", 2), tensor("vv", 6, 4)],
        [init("W", 6, 6), init("V", 6, 4), init("U", 4, 2), init("ub", 2)],
    )
    cm = compile_file(path)
    assert [summary(layer) for layer in cm.layers] == [
        ("W", "linear", "W", None, "in_out", 6, 6, 6, 6, 1, 2),
        ("U", "linear", "U", None, "in_out", 4, 2, 4, 2, 1, 1),
    ]
    w = cm.plan.layer("W")
    assert [(s.activation, s.preactivation) for s in w.sites] == [("x", "a"), ("ta", "b")]
    assert cm.unmatched == ["V", "ub"]
    why = reasons(cm)
    assert why["V"].startswith("shared:") and "Mul node" in why["V"]
    assert "Gemm node" in why["ub"]


def test_batch_norm_statistics_are_not_parameters(tmp_path):
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    path = save(
        tmp_path / "bn.onnx",
        nodes,
        [tensor("x", 2, 3, 4, 4)],
        [tensor("y", 2, 4, 4, 4)],
        [init("w", 4, 3, 1, 1), init("b", 4), init("gamma", 4), init("beta", 4), init("mean", 4), init("var", 4)],
    )
    cm = compile_file(path)
    assert [summary(layer) for layer in cm.layers] == [("w", "conv2d", "w", "b", "out_in", 3, 4, 4, 4, 1, 1)]
    assert cm.plan.parameters == ("w", "b", "gamma", "beta")
    assert cm.unmatched == ["gamma", "beta"]
    assert all("BatchNormalization" in reason for reason in reasons(cm).values())


def test_layer_names_are_unique_and_the_plan_round_trips(tmp_path, conv_file):
    """'fc.weight' and 'fc_weight' would both name a layer 'fc': both layers keep their weight's name."""
    nodes = [
        helper.make_node("MatMul", ["x", "fc.weight"], ["a"]),
        helper.make_node("MatMul", ["a", "fc_weight"], ["b"]),
        helper.make_node("MatMul", ["b", "head/kernel:0"], ["y"]),
    ]
    path = save(
        tmp_path / "names.onnx",
        nodes,
        [tensor("x", "N", 4)],
        [tensor("y", "N", 2)],
        [init("fc.weight", 4, 4), init("fc_weight", 4, 3), init("head/kernel:0", 3, 2)],
    )
    cm = compile_file(path)
    assert [layer.name for layer in cm.layers] == ["fc.weight", "fc_weight", "head"]
    for plan in (cm.plan, compile_file(conv_file).plan):
        assert type(plan).from_json(plan.to_json()) == plan
