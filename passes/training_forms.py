"""BatchNormalization, LayerNormalization, Dropout and CastLike in forms onnxruntime-training can differentiate.

Exporters write the first three in their one-output inference forms; onnxruntime-training's gradient
builder needs batch norm in training mode (its saved statistics), layer norm with its mean and
inverse-deviation outputs, and Dropout with its mask output. CastLike (torch.export writes it for the
attention scale) has no gradient builder at all; a Cast to the known dtype is the same op.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnx
from onnx import helper

TAP_PREFIX = "kronograph"


def is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _fresh_name(base: str, taken: set[str]) -> str:
    name = base
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def training_mode_outputs(proto: onnx.ModelProto) -> None:
    """Give BatchNormalization, LayerNormalization and Dropout the outputs their onnxruntime gradients read,
    in place.

    onnxruntime-training differentiates BatchNormalization only in training mode (it replaces the node by
    com.microsoft.BatchNormInternal, whose saved mean and inverse deviation the gradient reads), and
    Dropout only with its mask output; on the one-output forms that exporters write its gradient
    builder fails (``GradientBuilderBase::O ... i < node_->OutputDefs().size()``). Inference-form batch
    norms are switched to training mode; the running-mean and running-variance outputs that mode
    requires get fresh names and stay unused: the graph's running statistics are not updated by
    training on onnxruntime (the eval model keeps using the stored ones). Dropout gets a mask output and
    LayerNormalization its optional Mean and InvStdDev outputs (the same values in inference).
    """
    taken = {name for node in proto.graph.node for name in (*node.input, *node.output)}
    taken |= {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for node in proto.graph.node:
        if not is_default_domain(node) or len(node.output) != 1:
            continue
        if node.op_type == "Dropout":
            node.output.append(_fresh_name(f"{node.output[0]}.{TAP_PREFIX}.mask", taken))
        if node.op_type == "LayerNormalization":
            for stat in ("mean", "inv_std_dev"):
                node.output.append(_fresh_name(f"{node.output[0]}.{TAP_PREFIX}.{stat}", taken))
        if node.op_type != "BatchNormalization":
            continue
        modes = [attr for attr in node.attribute if attr.name == "training_mode"]
        if modes:
            modes[0].i = 1
        else:
            node.attribute.append(helper.make_attribute("training_mode", 1))
        for stat in ("running_mean", "running_var"):
            node.output.append(_fresh_name(f"{node.output[0]}.{TAP_PREFIX}.{stat}", taken))


def batch_norm_eval_outputs(path: Path) -> None:
    """Drop the unused running-statistics outputs that the eval model's BatchNormalization may not have.

    generate_artifacts switches BatchNormalization back to ``training_mode=0`` in the eval model but
    keeps its three outputs, which onnxruntime rejects ("should be 1 when Training_mode = False").
    """
    model = onnx.load(str(path))
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    changed = False
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or not is_default_domain(node) or len(node.output) == 1:
            continue
        if any(attr.name == "training_mode" and attr.i == 1 for attr in node.attribute):
            continue
        if not any(name in used for name in node.output[1:]):
            del node.output[1:]
            changed = True
    if changed:
        onnx.save(model, str(path))


def castlike_as_cast(proto: onnx.ModelProto, dtypes: Mapping[str, int]) -> None:
    """Replace CastLike(x, like) by Cast(x, to=dtype of like) where that dtype is known, in place.

    onnxruntime-training has no gradient builder for CastLike, and needs one whenever ``like`` depends
    on a trained weight (the attention scale cast like the queries), although only its dtype is read.
    ``dtypes`` (value name -> onnx elem type) is completed by onnx's type inference where it is silent.
    """
    nodes = [n for n in proto.graph.node if n.op_type == "CastLike" and is_default_domain(n)]
    if any(dtypes.get(n.input[1]) is None for n in nodes):
        inferred = onnx.shape_inference.infer_shapes(proto)
        known = (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
        dtypes = {**{v.name: v.type.tensor_type.elem_type for v in known if v.type.tensor_type.elem_type},
                  **{i.name: i.data_type for i in proto.graph.initializer}, **dtypes}
    for node in nodes:
        to = dtypes.get(node.input[1])
        if to is None:
            continue
        node.op_type = "Cast"
        del node.input[1:]
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("to", int(to)))
