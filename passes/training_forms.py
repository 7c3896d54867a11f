"""BatchNormalization, LayerNormalization, Dropout, CastLike and SplitToSequence in forms onnxruntime-training
can differentiate.

Exporters write the first three in their one-output inference forms; onnxruntime-training's gradient
builder needs batch norm in training mode (its saved statistics), layer norm with its mean and
inverse-deviation outputs, and Dropout with its mask output. CastLike (torch.export writes it for the
attention scale) has no gradient builder at all; a Cast to the known dtype is the same op. Neither have
SplitToSequence and SequenceAt (torch.export writes them for ``chunk``, as in a recurrent cell's gates): a
Split whose pieces are read at constant positions is the same graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

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


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The values of the graph's initializers and Constant nodes (those given as a tensor or ints)."""
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "Constant" or not is_default_domain(node) or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        if attr.name == "value":
            values[node.output[0]] = numpy_helper.to_array(attr.t)
        elif attr.name in ("value_int", "value_ints"):
            values[node.output[0]] = np.array(helper.get_attribute_value(attr), dtype=np.int64)
    return values


def _static_dims(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Each value's dims where onnx's shape inference knows its rank (None for a symbolic dim)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    dims = {}
    for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if v.type.tensor_type.HasField("shape"):
            dims[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    return dims


def _piece_sizes(node: onnx.NodeProto, constants: Mapping[str, np.ndarray], dims: Mapping[str, list]
                 ) -> list[int] | None:
    """The sizes of a SplitToSequence's pieces along its axis, where they are known before running."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    shape = dims.get(node.input[0])
    axis = int(attrs.get("axis", 0))
    length = None
    if shape is not None and -len(shape) <= axis < len(shape):
        length = shape[axis]
    split = constants.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if split is not None and split.ndim == 1:
        return [int(s) for s in split]
    if length is None:
        return None
    if split is None:  # pieces of one (squeezed unless keepdims)
        return [1] * length
    step = int(split)
    return [min(step, length - start) for start in range(0, length, step)] if step > 0 else None


def _read_in_subgraphs(graph: onnx.GraphProto) -> set[str]:
    """The names that the bodies of the graph's If / Loop / Scan nodes read (an outer value they capture)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for body in (*([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []), *attr.graphs):
                names.update(name for inner in body.node for name in inner.input)
                names |= _read_in_subgraphs(body)
    return names


def sequence_splits_as_split(proto: onnx.ModelProto) -> None:
    """Replace SplitToSequence(x) read only by SequenceAt at constant positions with Split(x), each SequenceAt
    by an Identity of its piece (Squeeze where the pieces drop the axis), in place.

    onnxruntime-training has no gradient for either sequence op, so every weight upstream of a ``chunk`` was
    "unreachable from the output node(s)" (a GRUCell's W_hh, say) and the training graph could not be built.
    """
    splits = [n for n in proto.graph.node if n.op_type == "SplitToSequence" and is_default_domain(n)]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not splits or opset < 13:  # Split's sizes and Squeeze's axes are inputs from opset 13
        return
    constants, dims = _constants(proto), _static_dims(proto)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in proto.graph.output} | _read_in_subgraphs(proto.graph)
    taken = {name for node in proto.graph.node for name in (*node.input, *node.output)}
    taken |= {v.name for v in (*proto.graph.input, *proto.graph.output)} | {i.name for i in proto.graph.initializer}
    for node in splits:
        sequence = node.output[0]
        uses = readers.get(sequence, [])
        sizes = _piece_sizes(node, constants, dims)
        if (sizes is None or sequence in outputs or not uses
                or any(u.op_type != "SequenceAt" or u.input[0] != sequence or constants.get(u.input[1]) is None
                       or not -len(sizes) <= int(constants[u.input[1]]) < len(sizes) for u in uses)):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = int(attrs.get("axis", 0))
        squeeze = not (len(node.input) > 1 and node.input[1]) and not int(attrs.get("keepdims", 1))
        pieces = [_fresh_name(f"{sequence}.{TAP_PREFIX}.piece{i}", taken) for i in range(len(sizes))]
        split_name = _fresh_name(f"{sequence}.{TAP_PREFIX}.sizes", taken)
        proto.graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), split_name))
        axes_name = None
        if squeeze:
            axes_name = _fresh_name(f"{sequence}.{TAP_PREFIX}.axis", taken)
            proto.graph.initializer.append(numpy_helper.from_array(np.array([axis], dtype=np.int64), axes_name))
        node.op_type = "Split"
        del node.input[1:]
        node.input.append(split_name)
        del node.output[:]
        node.output.extend(pieces)
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("axis", axis))
        for use in uses:
            position = int(constants[use.input[1]])
            piece = pieces[position + len(pieces) if position < 0 else position]
            use.op_type = "Squeeze" if squeeze else "Identity"
            del use.input[:]
            use.input.extend([piece, axes_name] if squeeze else [piece])
            del use.attribute[:]
