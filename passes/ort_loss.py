"""The loss that onnxruntime-training puts on the graph, and its quiet graph builder.

The loss blocks are onnxruntime's own (what ``artifacts.LossType`` selects); a small wrapper picks the
model output and names the label input, and moves the classes to axis 1 for cross-entropy on sequences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
from onnx import helper


def loss_block(loss: str, output: str, label: str, rank: int | None):
    """An onnxblock that puts ``loss`` on graph output ``output`` with label input ``label``.

    The blocks are onnxruntime's own (the ones ``LossType`` selects); the wrapper picks the model output
    and names the label input. Cross-entropy on a [batch, ..., classes] output (rank > 2) moves the
    classes to axis 1 first, the layout ONNX SoftmaxCrossEntropyLoss expects.
    """
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _graph_utils

    class _Loss(onnxblock.Block):
        def build(self, *_graph_outputs: str) -> str:
            if loss == "mse":
                return onnxblock.loss.MSELoss()(output, label)
            if loss == "sigmoid_cross_entropy":
                return onnxblock.loss.BCEWithLogitsLoss()(output, label)
            if rank is None or rank <= 2:
                return onnxblock.loss.CrossEntropyLoss()(output, label)
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
