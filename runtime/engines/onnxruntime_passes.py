"""runtime/engines/onnxruntime_passes: the passes K-FAC needs, on an ONNX graph run by onnxruntime-training.

``OnnxRuntimePasses`` gives ``runtime.methods.kfac.KFAC`` the same verbs as ``engines.torch.TorchEngine``, so the
whole algorithm of the paper (MC Fisher, tau_1 and tau_2 subsets, re-scaling, qmodel momentum, adaptive
lambda and gamma) runs on an .onnx model:

- ``gradient_pass``: one training step of the instrumented graph (``OnnxRuntimeEngine.forward_backward``):
  the mean loss, the parameter gradients and every site's taps (a, dL/ds) as SiteRecords;
- ``sampled_pass``: the model's outputs on tau_1 of the batch (the forward graph), targets sampled from
  them, and a second training step on those examples with the sampled targets as labels. Its taps feed
  the statistics; its gradients of ``fisher_parameters`` (K-FAC's Fisher diagonal of the parameters outside
  every block) are kept in ``sampled_gradients``, as the torch engine's, the others dropped;
- ``output_tangents``: J d by central differences of the forward graph's outputs,
  (f(theta + h d) - f(theta - h d)) / 2h, h moving no parameter tensor by more than ``DIFFERENCE_STEP``
  of its size: two forwards per direction; against forward-mode autograd (tests/test_engine_kfac_parity.py)
  the relative error is ~1e-4 for K-FAC's updates and ~1e-3 for random directions (float32 rounding);
  exact-F products need nothing else (appendix C's J d, then the loss's H);
- ``loss_value``: the loss of the forward graph's outputs (rho of the Levenberg-Marquardt rule).

The forward graph is the inference graph: with batch norm it uses the running statistics and dropout is
off, so for such models the sampled targets, F products and rho see the inference-mode network while the
gradient and the taps come from the training-mode one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kronograph.runtime.capture import SiteRecord, layer_input
from kronograph.runtime.engines.torch import GradientPass, Records
from kronograph.runtime.losses import Loss
from kronograph.runtime.quadratic import difference_products
from kronograph.runtime.statistics import subset


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _padding_rows(module: torch.nn.Module | None, names: Sequence[str]) -> dict[str, int]:
    """Each nn.Embedding table's padding_idx row, by parameter name: torch gives that row no gradient, but the ONNX
    export drops padding_idx, so onnxruntime's gradient has one, which these passes zero."""
    if module is None:
        return {}
    rows = {f"{name}.weight" if name else "weight": table.padding_idx for name, table in module.named_modules()
            if isinstance(table, torch.nn.Embedding) and table.padding_idx is not None}
    return {name: row for name, row in rows.items() if name in names}


class OnnxRuntimePasses:
    """K-FAC's passes on ``compiled.onnxruntime()``, the OnnxRuntimeEngine holding the weights."""

    name = "onnxruntime"
    device = torch.device("cpu")
    sharded = None  # an ONNX graph's weights are whole

    def __init__(self, compiled: Any, loss: Loss) -> None:
        self.compiled, self.loss = compiled, loss
        self.engine = compiled.onnxruntime()
        self.layers = {layer.name: layer for layer in compiled.plan.all_layers}
        self._theta: dict[str, torch.Tensor] = {}
        self._version = -1  # the engine's version that _theta holds
        self._padding = _padding_rows(compiled.module, list(self.parameters()))
        # As the torch engine's: the parameters whose statistics-loss gradient each sampled pass keeps, and those
        # gradients with each pass's examples, appended until cleared.
        self.fisher_parameters: list[str] = []
        self.sampled_gradients: list[tuple[dict[str, torch.Tensor], int]] = []

    def stepping(self) -> contextlib.AbstractContextManager[None]:
        """The span of one optimizer step: nothing to set up on this engine."""
        return contextlib.nullcontext()

    def parameters(self) -> dict[str, torch.Tensor]:
        """The trainable weights by ONNX initializer name: the optimizer's copy, re-read when someone else
        wrote the engine's weights (a resumed checkpoint)."""
        if self._version != self.engine.version:
            self._theta = {name: torch.from_numpy(value) for name, value in self.engine.parameters().items()}
            self._version = self.engine.version
        return self._theta

    def frozen(self) -> set[str]:
        """None: an ONNX graph's trainable set is fixed when its training artifacts are built."""
        return set()

    def _send(self, names) -> None:
        self.engine.set_parameters({name: self._theta[name].numpy() for name in names})
        self._version = self.engine.version

    def write_back(self) -> None:
        """Send the tensors of ``parameters()``, changed in place (e.g. by a torch optimizer), to the engine."""
        self._send(self._theta)

    def add_(self, update: Mapping[str, torch.Tensor]) -> None:
        theta = self.parameters()
        for name, delta in update.items():
            theta[name].add_(delta.to(theta[name].dtype))
        self._send(update)

    def set_(self, values: Mapping[str, torch.Tensor]) -> None:
        """theta = values (copies of ``parameters()`` taken earlier), sent to the engine."""
        theta = self.parameters()
        for name, value in values.items():
            theta[name].copy_(value)
        self._send(values)

    def _records(self, taps: Mapping[tuple[str, int], tuple[np.ndarray, np.ndarray]], scale: float = 1.0) -> Records:
        """The taps as the SiteRecords a torch Capture gives (g multiplied by ``scale``)."""
        records: Records = {}
        for (name, index), (a, g) in sorted(taps.items()):
            layer = self.layers[name]
            gradient = torch.from_numpy(np.asarray(g))
            rows = layer_input(layer, torch.from_numpy(np.asarray(a)), padding_idx=self._padding.get(layer.weight))
            records.setdefault(name, []).append(
                SiteRecord(layer=name, index=index, a=rows, output=None, geometry=layer.geometry,
                           g=gradient * scale if scale != 1 else gradient)
            )
        return records

    def gradient_pass(self, inputs: Sequence[torch.Tensor], targets: torch.Tensor, capture: bool,
                      keep_outputs: bool = False, layers: Collection[str] | None = None) -> GradientPass:
        """The torch engine's ``gradient_pass``; the outputs are not kept and every layer's sites are returned
        (``keep_outputs`` and ``layers`` are hints: the graph's taps cost the same either way)."""
        result = self.engine.forward_backward([_numpy(x) for x in inputs], _numpy(targets))
        if result.outputs is not None:  # every step: a batch of another shape must not broadcast
            self.loss.check_targets(torch.from_numpy(result.outputs), targets)
        grads = {name: self._gradient(result, name) for name in self.parameters()}
        return GradientPass(result.loss, grads, self._records(result.taps) if capture else None)

    def sampled_pass(self, inputs: Sequence[torch.Tensor], fraction: float, generator: torch.Generator,
                     minimum: int = 1) -> tuple[Records, int]:
        """Taps of a training step on tau_1 of the batch whose labels are sampled from the model's outputs;
        g is rescaled to the statistics loss (Loss.statistics_scale), as the torch engine's pass gives it, and so
        are the gradients of ``fisher_parameters`` kept in ``sampled_gradients``."""
        index = subset(inputs[0].shape[0], fraction, generator, minimum)
        sub = [_numpy(x if index is None else x[index]) for x in inputs]
        outputs = torch.from_numpy(self.engine.forward(sub))
        targets = self.loss.sample_targets(outputs, generator)
        result = self.engine.forward_backward(sub, _numpy(targets))
        scale, n = self.loss.statistics_scale(targets), sub[0].shape[0]
        if self.fisher_parameters:
            self.sampled_gradients.append(({name: self._gradient(result, name) * scale
                                            for name in self.fisher_parameters}, n))
        return self._records(result.taps, scale), n

    def _gradient(self, result: Any, name: str) -> torch.Tensor:
        """The step's gradient of one parameter as torch's: an embedding's padding row zeroed (``_padding_rows``)."""
        grad = torch.from_numpy(np.asarray(result.gradients[name]))  # a copy: StepResult's own
        if name in self._padding:
            grad[self._padding[name]] = 0
        return grad

    def output_tangents(self, inputs: Sequence[torch.Tensor], directions: Sequence[Mapping[str, torch.Tensor]],
                        outputs: torch.Tensor | None = None):
        """(outputs, [J d for d in directions]) by central differences of the forward graph's outputs (``outputs``,
        the forward at these weights when the caller has it, saves that forward)."""
        arrays = [_numpy(x) for x in inputs]
        theta = self.parameters()

        def forward_at(direction: Mapping[str, torch.Tensor] | None, h: float) -> torch.Tensor:
            values = None if direction is None else {
                name: theta[name].add(d.to(theta[name].dtype), alpha=h).numpy() for name, d in direction.items()}
            return torch.from_numpy(self.engine.forward(arrays, values))

        return difference_products(forward_at, theta, directions, outputs=outputs)

    def outputs(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The forward graph's outputs at the current weights (the inference graph: see the module's note)."""
        return torch.from_numpy(self.engine.forward([_numpy(x) for x in inputs]))

    def loss_value(self, inputs: Sequence[torch.Tensor], targets: torch.Tensor) -> float:
        outputs = torch.from_numpy(self.engine.forward([_numpy(x) for x in inputs]))
        return float(self.loss(outputs, targets))
