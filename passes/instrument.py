"""passes/instrument: make the ONNX graph emit what K-FAC needs, as onnxruntime-training artifacts.

For every site of every layer in the LayerPlan the training model returns, next to the loss:

- the activation a (the layer input, as the graph holds it: [batch, in], [batch, ..., in] for sequences,
  [batch, C, H, ...] for convolutions, [in, batch] for a Gemm with transA=1), and
- the gradient of the loss with respect to the pre-activation s (bias included), same shape as s.

How it is done (onnxruntime-training 1.19.2, ``onnxruntime.training.artifacts.generate_artifacts``):

1. Forward taps. Before the gradient graph is built, each activation gets an Identity node whose output,
   named by ``tap_names``, is made a graph output (``additional_output_names``). Graph outputs survive the
   pre-training graph transformers that ``generate_artifacts`` runs (``get_optimized_model``), so the tap
   exists even if an optimisation renames or fuses the producer of the activation. The model output (the
   graph output the loss is put on) is tapped the same way as ``MODEL_OUTPUT``, a name that does not
   depend on the exporter. The eval model returns these taps too.
2. Backward taps. ``GradientGraphBuilder`` names the gradient of a tensor ``t`` ``t_grad`` (when ``t`` has
   several consumers the partial gradients are summed into ``t_grad``). Every pre-activation of a layer
   whose weight requires a gradient lies on the path from that weight to the loss, so ``s_grad`` is
   materialised; it is not a graph output (only parameter gradients are, and those feed the
   gradient-accumulation buffers). The generated ``training_model.onnx`` is post-processed: an Identity
   node copies ``s_grad`` to a graph output named by ``tap_names``. Names ending in ``_grad`` would be
   dropped by ``Module.__call__``; the tap names end in the site index instead. If ``s_grad`` is absent
   (an optimisation fused the node that produces s with its consumer, or s does not reach the loss)
   instrumentation stops with a KronographError naming the site rather than emitting wrong numbers.
3. Batch norm and dropout. onnxruntime-training differentiates BatchNormalization only in training mode
   and Dropout only with its mask output; the one-output forms that torch.onnx.export and most .onnx
   files hold are given those outputs (batch norm then uses batch statistics, as PyTorch in train()).
   The running statistics are not updated by the training step; the eval model uses the stored ones.
4. Output order. The training model's user outputs are: the loss, the model output, then for every site
   in plan order its activation tap and its gradient tap (``TrainingArtifacts.outputs``).
   ``Module.__call__`` in training mode (``train_step``) returns them in this order as numpy arrays; the
   parameter gradients are not among them (read them from ``CheckpointState.parameters[name].grad``).
5. Forward model. ``forward_model.onnx`` is the inference graph as given (batch norm with its stored
   statistics, no dropout) with every trainable initializer turned into a graph input of the same name,
   so that a forward pass can run at weights other than the checkpoint's (line searches, re-scaling,
   evaluation at trial points) without writing them into the training state.

Scaling: the loss L is ``runtime.losses``' h = mean_i l_i (``passes.ort_loss``): cross-entropy's l_i is
the mean over the positions of sequence outputs, sigmoid cross-entropy's the sum over the example's
elements, mse's half the sum of squares. The emitted gradient tap is therefore dL/ds_i = (1/n) dl_i/ds_i
for a batch of n examples, for every loss. DESIGN.md's g is dl_i/ds_i, per example and not scaled:
``per_example_gradient`` multiplies by n (cross-entropy over T positions has the further factor that
``Loss.statistics_scale`` gives). The graph does not; the runtime calls that helper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from kronograph.errors import KronographError
from kronograph.passes.ort_loss import loss_block, quiet_graph_builder
from kronograph.passes.plan import LayerPlan
from kronograph.passes.training_forms import (
    TAP_PREFIX,
    batch_norm_eval_outputs,
    castlike_as_cast,
    sequence_splits_as_split,
    training_mode_outputs,
)

__all__ = [
    "LOSS_TYPES",
    "MODEL_OUTPUT",
    "TrainingArtifacts",
    "instrument",
    "per_example_gradient",
    "tap_names",
]

#: kronograph loss name -> what ``ort_loss.loss_block`` puts on the graph (h = mean_i l_i, as runtime.losses).
LOSS_TYPES = {
    "cross_entropy": "CrossEntropyLoss",
    "sigmoid_cross_entropy": "sum of BCE with logits per example, mean over the batch",
    "mse": "half the sum of squares per example, mean over the batch",
}
OPTIMIZERS = {"adamw": "AdamW", "sgd": "SGD"}
ArrayT = TypeVar("ArrayT", np.ndarray, "torch.Tensor")
#: onnxruntime 1.19 loads models up to this IR version (onnx >= 1.17 writes newer ones by default).
ORT_MAX_IR_VERSION = 10
#: The training and eval models' copy of the model output (the graph output the loss is put on).
MODEL_OUTPUT = f"{TAP_PREFIX}.output"


@dataclass(frozen=True)
class TrainingArtifacts:
    """The files ``instrument`` wrote and how to read the training model's outputs.

    Attributes:
        directory: the folder holding everything below.
        training_model, eval_model, optimizer_model: ONNX files for ``onnxruntime.training.api``
            (``Module(training_model, state, eval_model)``, ``Optimizer(optimizer_model, module)``).
        forward_model: the inference graph with the trainable parameters as graph inputs (after the data
            inputs) and the model output as its only output, for ``onnxruntime.InferenceSession``.
        checkpoint: the checkpoint (``CheckpointState.load_checkpoint``), trainable parameters by name.
        loss: "cross_entropy", "sigmoid_cross_entropy" or "mse".
        loss_output: the name of the loss output (first user output).
        model_output: the name of the model output's copy in the training and eval models (``MODEL_OUTPUT``).
        inputs: user inputs of the training model in call order: the data inputs, then the label.
        label: the label input's name.
        outputs: user outputs of the training model in the order ``Module.__call__`` returns them.
        eval_outputs: user outputs of the eval model (the loss, the model output, the activation taps).
        trainable: parameters (initializer names) whose gradients the training model computes.
        taps: (layer name, site index) -> (activation output, pre-activation gradient output).
    """

    directory: Path
    training_model: Path
    eval_model: Path
    optimizer_model: Path
    forward_model: Path
    checkpoint: Path
    loss: str
    loss_output: str
    model_output: str
    inputs: tuple[str, ...]
    label: str
    outputs: tuple[str, ...]
    eval_outputs: tuple[str, ...]
    trainable: tuple[str, ...]
    taps: dict[tuple[str, int], tuple[str, str]] = field(hash=False)

    def output_index(self, name: str) -> int:
        """Position of output ``name`` in what the training step returns."""
        return self.outputs.index(name)


def tap_names(plan: LayerPlan) -> dict[tuple[str, int], tuple[str, str]]:
    """(layer name, site index) -> (activation output name, pre-activation gradient output name).

    Names are ``kronograph.a.<layer>.<k>`` and ``kronograph.g.<layer>.<k>``: they never end in ``_grad``,
    which ``onnxruntime.training.api.Module`` would hide. The plan's tables are tapped too (K-FAC's blocks with a
    diagonal A: their indices and their output's gradient), and its ties' two views (K-FAC's tied blocks).
    """
    return {
        (layer.name, k): (f"{TAP_PREFIX}.a.{layer.name}.{k}", f"{TAP_PREFIX}.g.{layer.name}.{k}")
        for layer in plan.all_layers
        for k in range(len(layer.sites))
    }


def per_example_gradient(tap: ArrayT, batch_size: int | None = None) -> ArrayT:
    """DESIGN.md's g = dl_i/ds_i from the emitted dL/ds, L = mean_i l_i: multiply by the batch size n.

    ``batch_size`` defaults to the leading axis of ``tap`` (pre-activations are batch-first, also for a
    Gemm whose activation is transposed). Works on numpy arrays and torch tensors; keeps the dtype.
    """
    n = tap.shape[0] if batch_size is None else batch_size
    return tap * int(n)


def _value_info(name: str, value: ir.Value | None) -> onnx.ValueInfoProto:
    """A graph output declaration with the dtype and shape of ``value`` (float, unknown shape if absent)."""
    elem_type = int(value.dtype) if value is not None and value.dtype is not None else onnx.TensorProto.FLOAT
    shape = None
    if value is not None and value.shape is not None:
        shape = [dim if isinstance(dim, int) else (dim.value if dim.value is not None else None) for dim in value.shape]
    return helper.make_tensor_value_info(name, elem_type, shape)


def _values(model: ir.Model) -> dict[str, ir.Value]:
    graph = model.graph
    found: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    found.update({name: v for name, v in graph.initializers.items()})
    for node in graph:
        found.update({v.name: v for v in node.outputs if v.name})
    return found


def _tapped_model(model: ir.Model, plan: LayerPlan, taps: dict) -> tuple[onnx.ModelProto, str]:
    """The inference graph as a proto, with an Identity per activation tap and one for the model output,
    each made a graph output; returns it and the name of the model output."""
    values = _values(model)
    for (layer, k), names in taps.items():
        site = plan.layer(layer).sites[k]
        for tensor in (site.activation, site.preactivation):
            if tensor not in values:
                raise KronographError(
                    f"layer {layer} site {k}: tensor {tensor!r} is not in the graph; build the plan from this graph"
                )
    clash = [name for names in taps.values() for name in names if name in values]
    clash += [MODEL_OUTPUT] if MODEL_OUTPUT in values else []
    if clash:
        raise KronographError(f"the graph already has a tensor named {clash[0]!r}; rename it before instrumenting")
    proto = ir.to_proto(model)
    if not proto.graph.output:
        raise KronographError("the graph has no output to put a loss on; export the model with its output")
    output = proto.graph.output[0].name
    copies = [(output, MODEL_OUTPUT)]
    copies += [(plan.layer(layer).sites[k].activation, a_name) for (layer, k), (a_name, _) in taps.items()]
    for source, name in copies:
        proto.graph.node.append(helper.make_node("Identity", [source], [name], name=f"{name}/tap"))
        proto.graph.output.append(_value_info(name, values.get(source)))
    training_mode_outputs(proto)
    sequence_splits_as_split(proto)
    castlike_as_cast(proto, {name: int(v.dtype) for name, v in values.items() if v.dtype is not None})
    if proto.ir_version > ORT_MAX_IR_VERSION:
        proto.ir_version = ORT_MAX_IR_VERSION
    return proto, output


def _weights_as_inputs(model: ir.Model, trainable: Sequence[str]) -> onnx.ModelProto:
    """The inference graph with every trainable initializer turned into a graph input; one output."""
    proto = ir.to_proto(model)
    del proto.graph.output[1:]
    declared = {v.name for v in proto.graph.input}
    names = set(trainable)
    kept = []
    for initializer in proto.graph.initializer:
        if initializer.name not in names:
            kept.append(initializer)
        elif initializer.name not in declared:  # IR < 4 files may already list it as an input
            proto.graph.input.append(
                helper.make_tensor_value_info(initializer.name, initializer.data_type, list(initializer.dims))
            )
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    if proto.ir_version > ORT_MAX_IR_VERSION:
        proto.ir_version = ORT_MAX_IR_VERSION
    return proto


def _add_gradient_taps(path: Path, plan: LayerPlan, taps: dict, values: dict[str, ir.Value]) -> tuple[str, ...]:
    """Copy every ``<preactivation>_grad`` of the training model to its tap output; returns the user outputs."""
    model = onnx.load(str(path))
    produced = {name for node in model.graph.node for name in node.output}
    for (layer, k), (_, g_name) in taps.items():
        gradient = f"{plan.layer(layer).sites[k].preactivation}_grad"
        if gradient not in produced:
            raise KronographError(
                f"layer {layer} site {k}: onnxruntime-training's gradient graph has no {gradient!r} (the "
                "pre-activation was optimised away or does not reach the loss); report this model"
            )
        model.graph.node.append(helper.make_node("Identity", [gradient], [g_name], name=f"{g_name}/tap"))
    outputs = {o.name: o for o in model.graph.output}
    tapped = {MODEL_OUTPUT} | {name for pair in taps.values() for name in pair}
    user = [o for o in model.graph.output if o.name not in tapped and not o.name.endswith(".accumulation.out")]
    accumulation = [o for o in model.graph.output if o.name.endswith(".accumulation.out")]
    ordered = [*user, outputs[MODEL_OUTPUT]]
    for (layer, k), (a_name, g_name) in taps.items():
        ordered.append(outputs[a_name])
        ordered.append(_value_info(g_name, values[plan.layer(layer).sites[k].preactivation]))
    del model.graph.output[:]
    model.graph.output.extend(ordered + accumulation)
    onnx.save(model, str(path))
    return tuple(o.name for o in ordered)


def instrument(
    model: ir.Model,
    plan: LayerPlan,
    loss: str,
    out_dir: str | Path,
    *,
    label_name: str = "labels",
    optimizer: str = "adamw",
    frozen: Sequence[str] = (),
) -> TrainingArtifacts:
    """Write onnxruntime-training artifacts whose training step also returns K-FAC's taps.

    Args:
        model: the inference graph the plan was built from (``CompiledModel.graph``); not modified.
        plan: its LayerPlan; every site's activation and pre-activation gradient is tapped.
        loss: "cross_entropy" (int64 class labels), "sigmoid_cross_entropy" (float targets in [0, 1]) or
            "mse", put on the graph's first output; it equals ``runtime.losses.get_loss(loss)``.
        out_dir: folder for training_model.onnx, eval_model.onnx, optimizer_model.onnx, checkpoint and
            forward_model.onnx.
        label_name: name of the label (target) input that the loss adds.
        optimizer: "adamw" or "sgd", for optimizer_model.onnx.
        frozen: initializers to keep as non-trainable parameters in the checkpoint (others that are not
            trainable stay constants of the graph).
    Returns:
        TrainingArtifacts: the paths, the input and output order and ``taps`` (see ``tap_names``).
    Raises:
        KronographError: unknown loss or optimizer, a plan that does not fit the graph, or a graph that
            onnxruntime-training cannot differentiate.
    """
    from onnxruntime.training import artifacts

    if loss not in LOSS_TYPES:
        raise KronographError(f"unknown loss {loss!r}; choose one of {', '.join(LOSS_TYPES)}")
    if optimizer not in OPTIMIZERS:
        raise KronographError(f"unknown optimizer {optimizer!r} for onnxruntime-training; choose adamw or sgd")
    initializers = model.graph.initializers
    trainable = [name for name in plan.parameters if name in initializers]
    if not trainable:
        raise KronographError("no trainable parameter of the plan is an initializer of the graph; nothing to train")
    frozen_params = [name for name in frozen if name in initializers and name not in trainable]
    values = _values(model)
    if label_name in values:
        raise KronographError(f"the graph already has a tensor named {label_name!r}; pass another label_name")
    taps = tap_names(plan)
    forward, output = _tapped_model(model, plan, taps)
    rank = len(values[output].shape) if output in values and values[output].shape is not None else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    activation_taps = [a for a, _ in taps.values()]
    try:
        with quiet_graph_builder():
            artifacts.generate_artifacts(
                forward,
                requires_grad=trainable,
                frozen_params=frozen_params,
                loss=loss_block(loss, output, label_name, rank),
                optimizer=getattr(artifacts.OptimType, OPTIMIZERS[optimizer]),
                artifact_directory=out_dir,
                additional_output_names=[MODEL_OUTPUT, *activation_taps],
            )
    except Exception as error:  # onnxruntime raises RuntimeError, Fail, LookupError, checker errors
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = first.split(" : FAIL : ")[-1]  # drop onnxruntime's source location and status prefix
        raise KronographError(
            f"onnxruntime-training could not build the training graph ({first}); check that every op of the "
            "model has a gradient in onnxruntime-training, or train with engine='torch'"
        ) from error
    training_model = out_dir / "training_model.onnx"
    outputs = _add_gradient_taps(training_model, plan, taps, values)
    batch_norm_eval_outputs(out_dir / "eval_model.onnx")
    eval_model = onnx.load(str(out_dir / "eval_model.onnx"), load_external_data=False)
    eval_outputs = tuple(o.name for o in eval_model.graph.output)
    data_inputs = [v.name for v in model.graph.inputs if v.name not in initializers]
    onnx.save(_weights_as_inputs(model, trainable), str(out_dir / "forward_model.onnx"))
    return TrainingArtifacts(
        directory=out_dir,
        training_model=training_model,
        eval_model=out_dir / "eval_model.onnx",
        optimizer_model=out_dir / "optimizer_model.onnx",
        forward_model=out_dir / "forward_model.onnx",
        checkpoint=out_dir / "checkpoint",
        loss=loss,
        loss_output=outputs[0],
        model_output=MODEL_OUTPUT,
        inputs=(*data_inputs, label_name),
        label=label_name,
        outputs=outputs,
        eval_outputs=eval_outputs,
        trainable=tuple(trainable),
        taps=taps,
    )
