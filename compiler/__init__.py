"""compiler/: turn a PyTorch module or an ONNX file into a CompiledModel (graph + LayerPlan)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
import torch

from kronograph.compiler.compiled import ENGINES, LOSSES, CompiledModel, check_loss
from kronograph.compiler.export import export_module
from kronograph.compiler.load import load_onnx
from kronograph.compiler.parameters import module_parameters, onnx_parameters
from kronograph.errors import KronographError
from kronograph.passes.match import build_plan

__all__ = ["ENGINES", "LOSSES", "CompiledModel", "compile", "export_module", "load_onnx"]


def compile(  # noqa: A001 - the contract's name
    model: torch.nn.Module | str | Path,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    loss: str = "cross_entropy",
    engine: str | None = None,
    trainable: Sequence[str] | None = None,
) -> CompiledModel:
    """Export or load ``model``, match its linear and convolution layers and return a CompiledModel.

    Args:
        model: an nn.Module (with ``example_inputs``) or the path of an .onnx file.
        example_inputs: a batch the module's forward() accepts (a tensor or a tuple of tensors).
        loss: "cross_entropy" (softmax, integer labels), "sigmoid_cross_entropy" or "mse".
        engine: "torch" for a module, "onnxruntime" for an ONNX file (the defaults); a module compiled with
            engine="onnxruntime" is trained as its exported graph (its own parameters are not updated).
        trainable: for ONNX files, the initializers to train (default: every floating-point initializer
            with more than one element, except batch-norm running statistics).
    """
    check_loss(loss)
    if engine is not None and engine not in ENGINES:
        raise KronographError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if isinstance(model, (str, Path)):
        if engine == "torch":
            raise KronographError("an ONNX file runs on engine='onnxruntime'; drop engine= or pass an nn.Module")
        graph = load_onnx(model)
        parameters = onnx_parameters(graph, trainable)
        plan = build_plan(graph, parameters)
        return CompiledModel(engine="onnxruntime", plan=plan, graph=graph, loss=loss)
    if not isinstance(model, torch.nn.Module):
        raise KronographError(
            f"cannot compile a {type(model).__name__}; pass a torch.nn.Module with example_inputs, or an .onnx path"
        )
    if example_inputs is None:
        raise KronographError("a PyTorch module needs example_inputs=(x,): a batch its forward() accepts")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    graph = export_module(model, example_inputs)
    parameters, missing = module_parameters(model, graph)
    plan = build_plan(graph, parameters, missing)
    return CompiledModel(
        engine=engine or "torch", plan=plan, graph=graph, loss=loss, module=model, example_inputs=example_inputs
    )
