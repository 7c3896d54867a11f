"""runtime/engines/onnxruntime: run a CompiledModel's training step on onnxruntime-training.

``OnnxRuntimeEngine(compiled, workdir)`` writes the instrumented artifacts (``passes.instrument``) into
``workdir`` and opens them with ``onnxruntime.training.api``. One ``forward_backward`` is one training
step without an optimizer: the loss, the model output, the taps of every site and the parameter
gradients come back as numpy arrays, and the weights stay as they were. The K-FAC runtime (or plain SGD)
computes the update and writes the new weights with ``set_parameters``; the next step uses them.
``forward`` runs the inference graph at the current weights or at trial values for some of them, without
touching the training state. ``export_onnx`` writes the inference graph (the one the plan was built
from, not the eval model with its taps) with the weights the engine holds now.

Scaling: the loss is ``runtime.losses.get_loss(compiled.loss)``, h = mean_i l_i, so the gradient taps are
dL/ds_i = (1/n) dl_i/ds_i for every loss; see ``passes.instrument.per_example_gradient`` (and
``Loss.statistics_scale`` for cross-entropy over positions).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kronograph.compiler.export import write_graph
from kronograph.errors import KronographError
from kronograph.passes.instrument import TrainingArtifacts, instrument

__all__ = ["OnnxRuntimeEngine", "StepResult"]


@dataclass
class StepResult:
    """What one training step of the engine returns.

    Attributes:
        loss: the loss h = mean_i l_i of the batch (``runtime.losses``).
        taps: (layer name, site index) -> (activation a, pre-activation gradient dL/ds), as the graph holds them.
        gradients: parameter (ONNX initializer) name -> dL/dparameter, shaped like the parameter.
        outputs: the model output the loss was put on (training mode: batch statistics, dropout on).
    """

    loss: float
    taps: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    gradients: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: np.ndarray | None = None


def session_options() -> Any:
    """onnxruntime sessions that share the CPU with torch: as many threads as torch uses, and no spinning.

    onnxruntime's idle threads spin for a while after each run by default; with torch's matrix products
    (K-FAC's statistics, inverses and preconditioning) running right after on the same cores, that made
    them 1.5-5x slower (measured on 2 cores)."""
    from onnxruntime import SessionOptions

    options = SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy array from a numpy array, a torch tensor (detached, on the CPU) or anything array-like."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value))


class OnnxRuntimeEngine:
    """A CompiledModel (engine "onnxruntime") trained step by step on onnxruntime-training.

    Args:
        compiled: the CompiledModel; its ``graph``, ``plan`` and ``loss`` are used, not modified.
        workdir: folder for the artifacts (training, eval, optimizer and forward models, checkpoint).
    Attributes:
        artifacts: the TrainingArtifacts (input and output order, tap names, trainable parameters).
    """

    def __init__(self, compiled: Any, workdir: str | Path) -> None:
        from onnxruntime.training.api import CheckpointState, Module

        self.compiled = compiled
        self.artifacts: TrainingArtifacts = instrument(compiled.graph, compiled.plan, compiled.loss, workdir)
        self._state = CheckpointState.load_checkpoint(str(self.artifacts.checkpoint))
        try:
            self._module = Module(str(self.artifacts.training_model), self._state, str(self.artifacts.eval_model),
                                  session_options=session_options())
        except RuntimeError as error:
            missing = re.search(r"implementation for (\w+)\(\d+\) node with name '([^']*)'", str(error))
            if missing is None:
                raise
            raise KronographError(
                f"onnxruntime-training has no kernel for {missing[1]} (node {missing[2]!r}) on this machine: it "
                "cannot train this model's graph; train the PyTorch module on the torch engine "
                "(kronograph.compile(module, example_inputs, ...))") from None
        if self._module.output_names() != list(self.artifacts.outputs):
            raise KronographError(
                "onnxruntime-training returns the training outputs in another order than instrument wrote; "
                "report this model"
            )
        self._module.train()
        self._session: Any = None  # the forward model's InferenceSession, opened by the first forward()
        # Views of the checkpoint state's weight buffers (Parameter.data does not copy): forward() feeds
        # them without copying; set_parameters refreshes them.
        self._weights = {name: self._state.parameters[name].data for name in self.trainable}
        self.version = 0  # counts set_parameters calls: holders of a copy of the weights see a change

    @property
    def trainable(self) -> tuple[str, ...]:
        """The names of the parameters the engine trains, in plan order."""
        return self.artifacts.trainable

    def _label(self, targets: Any) -> np.ndarray:
        labels = _to_numpy(targets)
        if self.artifacts.loss == "cross_entropy":
            if not np.issubdtype(labels.dtype, np.integer):
                raise KronographError("cross_entropy needs integer class labels as targets")
            return labels.astype(np.int64, copy=False)
        return labels.astype(np.float32, copy=False)

    def forward_backward(self, inputs: Sequence[Any], targets: Any) -> StepResult:
        """One forward and backward pass on a batch; the weights do not change.

        Args:
            inputs: the data inputs in the graph's order (numpy arrays or torch tensors).
            targets: class indices for cross_entropy, float targets for the other losses.
        Returns:
            StepResult: the loss, the taps, the parameter gradients and the model output of this batch alone.
        """
        arrays = [_to_numpy(x) for x in inputs]
        expected = len(self.artifacts.inputs) - 1
        if len(arrays) != expected:
            raise KronographError(f"the model takes {expected} data input(s), got {len(arrays)}")
        self._module.train()
        self._module.lazy_reset_grad()
        fetched = self._module(*arrays, self._label(targets))
        if not isinstance(fetched, (list, tuple)):
            fetched = [fetched]
        outputs = dict(zip(self.artifacts.outputs, fetched, strict=True))
        taps = {site: (outputs[a], outputs[g]) for site, (a, g) in self.artifacts.taps.items()}
        gradients = {}
        for name in self.trainable:
            grad = self._state.parameters[name].grad
            if grad is None:
                raise KronographError(f"onnxruntime-training holds no gradient for {name!r}")
            gradients[name] = np.array(grad, copy=True)
        return StepResult(
            loss=float(outputs[self.artifacts.loss_output]),
            taps=taps,
            gradients=gradients,
            outputs=outputs[self.artifacts.model_output],
        )

    def forward(self, inputs: Sequence[Any], parameters: Mapping[str, Any] | None = None) -> np.ndarray:
        """The model output in inference mode, at the current weights or at ``parameters`` for some of them.

        The training state is left alone: trial weights (a line search, re-scaling) need no
        ``set_parameters`` and no write-back.

        Args:
            inputs: the data inputs in the graph's order (numpy arrays or torch tensors).
            parameters: trainable parameter name -> value to use instead of the current weight.
        Returns:
            np.ndarray: the graph output the loss is put on (batch norm with its stored statistics, no dropout).
        Raises:
            KronographError: a wrong number of inputs, an unknown parameter name, a wrong shape, or inputs
                that onnxruntime rejects (dtype, shape).
        """
        arrays = [_to_numpy(x) for x in inputs]
        names = self.artifacts.inputs[:-1]
        if len(arrays) != len(names):
            raise KronographError(f"the model takes {len(names)} data input(s), got {len(arrays)}")
        feed = dict(zip(names, arrays, strict=True))
        feed.update(self._weights)
        for name, value in (parameters or {}).items():
            if name not in self._weights:
                raise KronographError(f"{name!r} is not a trainable parameter of this engine")
            current = self._weights[name]
            array = _to_numpy(value).astype(current.dtype, copy=False)
            if array.shape != current.shape:
                raise KronographError(f"{name}: shape {array.shape} does not match the parameter's {current.shape}")
            feed[name] = array
        session = self._forward_session()
        try:
            return session.run(None, feed)[0]
        except Exception as error:  # onnxruntime's InvalidArgument, Fail, RuntimeException
            first = str(error).strip().splitlines()[0].split(" : ")[-1] if str(error).strip() else repr(error)
            raise KronographError(f"onnxruntime could not run the forward model ({first}); check the inputs") from error

    def _forward_session(self) -> Any:
        if self._session is None:
            import onnxruntime

            options = session_options()
            self._session = onnxruntime.InferenceSession(
                str(self.artifacts.forward_model), options, providers=["CPUExecutionProvider"]
            )
        return self._session

    def parameters(self) -> dict[str, np.ndarray]:
        """The trainable weights as the engine holds them now (copies), by ONNX initializer name."""
        return {name: np.array(self._state.parameters[name].data, copy=True) for name in self.trainable}

    def set_parameters(self, values: Mapping[str, Any]) -> None:
        """Write new values for some or all trainable weights; the next step uses them.

        Raises:
            KronographError: an unknown name or a shape that differs from the parameter's.
        """
        for name, value in values.items():
            if name not in self.trainable:
                raise KronographError(f"{name!r} is not a trainable parameter of this engine")
            parameter = self._state.parameters[name]
            current = parameter.data
            array = np.ascontiguousarray(_to_numpy(value), dtype=current.dtype)
            if array.shape != current.shape:
                raise KronographError(f"{name}: shape {array.shape} does not match the parameter's {current.shape}")
            parameter.data = array
            self._weights[name] = parameter.data
        self.version += 1

    def export_onnx(self, path: str | Path) -> Path:
        """Write the inference graph (no taps, no loss) with the current weights as its initializers."""
        return write_graph(self.compiled.graph, Path(path), self.parameters())
