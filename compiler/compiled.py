"""CompiledModel: the source model, its ONNX graph and its LayerPlan, behind the contract of DESIGN.md."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from kronograph.compiler.export import export_inference, write_graph
from kronograph.errors import KronographError
from kronograph.passes.graph import rearranged_from
from kronograph.passes.plan import Layer, LayerPlan

LOSSES = ("cross_entropy", "sigmoid_cross_entropy", "mse")
ENGINES = ("torch", "onnxruntime")


class CompiledModel:
    """What ``kronograph.compile`` returns.

    Attributes:
        engine: "torch" (the user's own module; parameters shared, updated in place) or "onnxruntime"
            (the ONNX graph's initializers are the weights).
        plan: the LayerPlan; ``layers`` and ``unmatched`` are its views.
        graph: the ONNX graph (onnx_ir) the plan was built from.
        module: the source nn.Module (None for an .onnx file); with engine "onnxruntime" it is only the source
            of the graph: training updates the engine's weights (``state_dict``), not the module.
        loss: the loss name ("cross_entropy", "sigmoid_cross_entropy" or "mse").
        output: in words, the model output the loss is put on (compile's ``output=``; also ``plan.output``).
        verbose: whether exporting the module again (``export_onnx``) shows torch's exporter output, as compile did.
    """

    def __init__(
        self,
        *,
        engine: str,
        plan: LayerPlan,
        graph: ir.Model,
        loss: str,
        module: torch.nn.Module | None = None,
        example_inputs: tuple[torch.Tensor, ...] = (),
        select: Callable[[Any], torch.Tensor] | None = None,
        output: str = "the model's output tensor",
        verbose: bool = False,
    ) -> None:
        self.engine = engine
        self.plan = plan
        self.graph = graph
        self.loss = loss
        self.module = module
        self.example_inputs = example_inputs
        self.output = output
        self.verbose = verbose
        self._select = select
        self._onnxruntime = None  # the OnnxRuntimeEngine holding the weights once training started

    def select_output(self, outputs: Any) -> torch.Tensor:
        """The tensor the loss is put on, out of what the module's forward() returned (compile's ``output=``)."""
        return outputs if self._select is None else self._select(outputs)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The module on a batch, reduced to the output the loss is put on (torch engine)."""
        return self.select_output(self.module(*inputs))

    def onnxruntime(self, workdir: str | Path | None = None):
        """The onnxruntime-training engine of this model (engine "onnxruntime"), created on first use with its
        artifacts in ``workdir`` (default: a temporary folder removed at exit). Once it exists it holds the
        weights: ``state_dict`` and ``export_onnx`` read them from it."""
        if self.engine != "onnxruntime":
            raise KronographError("this model runs on the torch engine; compile it with engine='onnxruntime'")
        if self._onnxruntime is None:
            from kronograph.runtime.engines.onnxruntime import OnnxRuntimeEngine

            if workdir is None:
                workdir = tempfile.mkdtemp(prefix="kronograph-ort-")
                weakref.finalize(self, shutil.rmtree, workdir, True)
            self._onnxruntime = OnnxRuntimeEngine(self, workdir)
        return self._onnxruntime

    @property
    def layers(self) -> tuple[Layer, ...]:
        return self.plan.layers

    @property
    def output_layers(self) -> tuple[str, ...]:
        """The layers whose output is the one the loss is put on (the graph's first output, up to reshapes, casts
        and slices): a classifier's or a language model's head, whose G holds the loss's per-class curvature."""
        outputs = list(self.graph.graph.outputs)
        if not outputs:
            return ()
        logits = rearranged_from(outputs[0])
        heads = (*self.layers, *(tie.output for tie in self.plan.ties), *self.plan.normed)  # tied, weight-normed too
        return tuple(layer.name for layer in heads if any(site.preactivation in logits for site in layer.sites))

    @property
    def unmatched(self) -> list[str]:
        return [entry.name for entry in self.plan.unmatched]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights (and buffers) by the source model's names, whatever the engine."""
        if self.engine == "torch":
            return {name: tensor.detach() for name, tensor in self.module.state_dict().items()}
        weights = {
            name: torch.from_numpy(np.array(value.const_value.numpy()))
            for name, value in self.graph.graph.initializers.items()
            if value.const_value is not None
        }
        if self._onnxruntime is not None:
            weights.update({name: torch.from_numpy(v) for name, v in self._onnxruntime.parameters().items()})
        return weights

    def export_onnx(self, path: str | Path) -> Path:
        """Write the inference graph with the current weights (batch norm in inference mode)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._onnxruntime is not None:
            return self._onnxruntime.export_onnx(path)
        if self.engine == "onnxruntime":
            return write_graph(self.graph, path)
        export_inference(self.module, self.example_inputs, path, verbose=self.verbose)
        return path

    def __repr__(self) -> str:
        return (
            f"CompiledModel(engine={self.engine!r}, loss={self.loss!r}, layers={len(self.layers)}, "
            f"unmatched={len(self.plan.unmatched)})"
        )


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise KronographError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return loss
