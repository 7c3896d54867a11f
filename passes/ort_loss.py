"""The loss that onnxruntime-training puts on the graph, and its quiet graph builder.

Each loss equals ``kronograph.runtime.losses.get_loss(name)(outputs, targets)``: the mean over the
examples of the per-example loss l_i. Softmax cross-entropy is onnxruntime's own block (its mean is the
token mean); sigmoid cross-entropy and mse sum over each example's elements, so their blocks are built
here: an element-wise loss, a ReduceSum over everything, and a division by the batch size read from
the output's shape at run time (mse also halves).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper


def loss_block(loss: str, output: str, label: str, rank: int | None):
    """An onnxblock that puts ``loss`` on graph output ``output`` with label input ``label``.

    Cross-entropy on [batch, classes] is onnxruntime's CrossEntropyLoss; on a [batch, ..., classes]
    output (rank > 2) the classes move to axis 1 first, the layout ONNX SoftmaxCrossEntropyLoss expects.
    Sigmoid cross-entropy and mse are built from plain ops (see the module docstring); the label input
    has the output's dtype and shape.
    """
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _graph_utils

    class _Loss(onnxblock.Block):
        def _node(self, op: str, inputs: list[str], token: str, **attributes) -> str:
            name = _graph_utils.generate_graph_name(f"kronograph.{token}")
            self.base.graph.node.append(helper.make_node(op, inputs, [name], name=f"{name}/node", **attributes))
            return name

        def _constant(self, value, token: str, dtype: np.dtype) -> str:
            name = _graph_utils.generate_graph_name(f"kronograph.{token}")
            self.base.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
            return name

        def _label_like_output(self) -> None:
            labels = onnx.ValueInfoProto()
            labels.CopyFrom(_graph_utils.get_output_from_output_name(self.base, output))
            labels.name = label
            self.base.graph.input.append(labels)

        def _per_example_sum(self, elementwise: str, scale: float) -> str:
            """scale * (sum of all elements) / batch size: the mean over examples of the per-example sums."""
            elem_type = _graph_utils.get_output_from_output_name(self.base, output).type.tensor_type.elem_type
            dtype = helper.tensor_dtype_to_np_dtype(elem_type)
            total = self._node("ReduceSum", [elementwise], "sum", keepdims=0)
            shape = self._node("Shape", [output], "shape")
            batch = self._node("Gather", [shape, self._constant(0, "batch_axis", np.int64)], "batch", axis=0)
            mean = self._node("Div", [total, self._node("Cast", [batch], "batch_size", to=elem_type)], "mean")
            return mean if scale == 1.0 else self._node("Mul", [mean, self._constant(scale, "scale", dtype)], "loss")

        def build(self, *_graph_outputs: str) -> str:
            if loss == "mse":
                self._label_like_output()
                residual = self._node("Sub", [output, label], "residual")
                return self._per_example_sum(self._node("Mul", [residual, residual], "squares"), 0.5)
            if loss == "sigmoid_cross_entropy":
                return self._per_example_sum(self._binary_cross_entropy(), 1.0)
            if rank is None or rank <= 2:
                return onnxblock.loss.CrossEntropyLoss()(output, label)
            return self._sequence_cross_entropy()

        def _binary_cross_entropy(self) -> str:
            """max(s, 0) - s t + log(1 + exp(-|s|)), the overflow-free form (torch's), with -|s| = s - 2 relu(s).

            Its gradient is sigmoid(s) - t everywhere, also at s = 0 where onnxruntime's ReluGrad is 0.
            """
            elem_type = _graph_utils.get_output_from_output_name(self.base, output).type.tensor_type.elem_type
            self._label_like_output()
            relu = self._node("Relu", [output], "relu")
            minus_abs = self._node("Sub", [output, self._node("Add", [relu, relu], "twice_relu")], "minus_abs")
            one = self._constant(1.0, "one", helper.tensor_dtype_to_np_dtype(elem_type))
            softplus = self._node("Log", [self._node("Add", [self._node("Exp", [minus_abs], "exp"), one], "1p")], "log")
            linear = self._node("Sub", [relu, self._node("Mul", [output, label], "st")], "linear")
            return self._node("Add", [linear, softplus], "bce")

        def _sequence_cross_entropy(self) -> str:
            graph_output = _graph_utils.get_output_from_output_name(self.base, output)
            labels = onnx.ValueInfoProto()
            labels.CopyFrom(graph_output)
            labels.name = label
            labels.type.tensor_type.elem_type = onnx.TensorProto.INT64
            del labels.type.tensor_type.shape.dim[-1]
            self.base.graph.input.append(labels)
            scores = _graph_utils.generate_graph_name("kronograph.scores")
            loss_name = _graph_utils.generate_graph_name("loss")
            perm = [0, rank - 1, *range(1, rank - 1)]
            self.base.graph.node.extend(
                [
                    helper.make_node("Transpose", [output], [scores], perm=perm, name=f"{scores}/node"),
                    helper.make_node(
                        "SoftmaxCrossEntropyLoss",
                        [scores, label],
                        [loss_name, _graph_utils.generate_graph_name("log_prob")],
                        reduction="mean",
                        name=f"{loss_name}/node",
                    ),
                ]
            )
            return loss_name

    return _Loss()


@contextlib.contextmanager
def quiet_graph_builder() -> Iterator[None]:
    """generate_artifacts optimises with a default SessionOptions, which logs every transformer at INFO."""
    from onnxruntime import SessionOptions
    from onnxruntime.training.onnxblock import _training_graph_utils as utils

    original = getattr(utils, "SessionOptions", None)
    if original is None:
        yield
        return

    def quiet_options() -> SessionOptions:
        options = original()
        options.log_severity_level = 3
        return options

    utils.SessionOptions = quiet_options
    try:
        yield
    finally:
        utils.SessionOptions = original
