"""compiler/: turn a PyTorch module or an ONNX file into a CompiledModel (graph + LayerPlan)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
import torch

from kronograph.compiler.bags import BagCalls
from kronograph.compiler.compiled import ENGINES, LOSSES, CompiledModel, check_loss
from kronograph.compiler.export import export_module
from kronograph.compiler.load import load_onnx
from kronograph.compiler.opaque import refuse_opaque
from kronograph.compiler.outputs import OutputChoice, OutputSelector, example_outputs, put_first
from kronograph.compiler.parameters import module_parameters, onnx_parameters
from kronograph.compiler.recurrent import RecurrentCalls
from kronograph.compiler.wrappers import refuse_sharded, unwrapped
from kronograph.errors import KronographError
from kronograph.passes.match import build_plan

__all__ = ["ENGINES", "LOSSES", "CompiledModel", "compile", "export_module", "load_onnx"]


def compile(  # noqa: A001 - the contract's name
    model: torch.nn.Module | str | Path,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    loss: str = "cross_entropy",
    engine: str | None = None,
    trainable: Sequence[str] | None = None,
    output: OutputChoice = None,
    verbose: bool = False,
) -> CompiledModel:
    """Export or load ``model``, match its linear and convolution layers and return a CompiledModel.

    Args:
        model: an nn.Module (with ``example_inputs``) or the path of an .onnx file. A ``torch.compile`` or
            ``DistributedDataParallel`` wrapper is seen through: the module inside is planned and trained (its
            parameters are the wrapper's), so DDP's reducer never runs and KFAC's own all_reduce is the only
            one. An FSDP-sharded module (fully_shard, FullyShardedDataParallel, DTensor parameters) raises
            KronographError: compile the plain module, then shard it in place (fully_shard) for
            KFACPreconditioner, which runs in an FSDP2 loop (compiler/wrappers.py).
        example_inputs: a batch the module's forward() accepts (a tensor or a tuple of tensors).
        loss: "cross_entropy" (softmax, integer labels), "sigmoid_cross_entropy" or "mse".
        engine: "torch" for a module, "onnxruntime" for an ONNX file (the defaults); a module compiled with
            engine="onnxruntime" is trained as its exported graph (its own parameters are not updated).
        trainable: for ONNX files, the initializers to train (default: every floating-point initializer
            with more than one element, except batch-norm running statistics).
        output: the model output the loss is put on, when forward() returns more than a tensor: a key of a
            dict or Hugging Face ModelOutput, a position in a tuple, or a callable (default: "logits", or
            element 0 of a tuple; compiler/outputs.py). For an .onnx file, the graph output's position
            (default 0). ``cm.output`` and ``cm.plan.output`` say what was chosen.
        verbose: show torch's exporter output (warnings, progress, the graph dumps of a failed trace); by
            default it is silenced and a failure is one KronographError naming the fix.
    """
    check_loss(loss)
    if engine is not None and engine not in ENGINES:
        raise KronographError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if isinstance(model, (str, Path)):
        if engine == "torch":
            raise KronographError("an ONNX file runs on engine='onnxruntime'; drop engine= or pass an nn.Module")
        graph = load_onnx(model)
        if not (output is None or isinstance(output, int)) or isinstance(output, bool):
            raise KronographError(f"output={output!r}: an .onnx file's output is chosen by its position (an int)")
        if output is not None and not 0 <= output < len(graph.graph.outputs):
            raise KronographError(f"output={output}, but the graph has {len(graph.graph.outputs)} output(s)")
        put_first(graph, output)
        parameters = onnx_parameters(graph, trainable)
        plan = dataclasses.replace(build_plan(graph, parameters), output=f"graph output {output or 0}")
        return CompiledModel(engine="onnxruntime", plan=plan, graph=graph, loss=loss, output=plan.output)
    if not isinstance(model, torch.nn.Module):
        raise KronographError(
            f"cannot compile a {type(model).__name__}; pass a torch.nn.Module with example_inputs, or an .onnx path"
        )
    # torch.compile and DistributedDataParallel wrappers: K-FAC's passes run the module inside (DDP's reducer
    # must not sum the gradient KFAC sums itself); FSDP's sharded parameters are refused (compiler/wrappers.py).
    model = unwrapped(model)
    refuse_sharded(model)
    if example_inputs is None:
        raise KronographError("a PyTorch module needs example_inputs=(x,): a batch its forward() accepts")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    graph = export_module(model, example_inputs, verbose=verbose)
    if engine == "onnxruntime":
        refuse_opaque(graph, "engine='onnxruntime'")
    recurrent_calls, bag_calls = RecurrentCalls(), BagCalls()  # the example forward's GRU / LSTM / RNN and bag calls
    selector = OutputSelector(output, example_outputs(model, example_inputs, recurrent_calls, bag_calls))
    put_first(graph, selector.graph_index)
    parameters, missing = module_parameters(model, graph)
    plan = dataclasses.replace(build_plan(graph, parameters, missing), output=selector.description)
    if (engine or "torch") == "torch":  # recurrent maps and bags are sites of the torch engine's capture only
        plan = bag_calls.plan_with_tables(model, recurrent_calls.plan_with_layers(model, plan))
    return CompiledModel(
        engine=engine or "torch", plan=plan, graph=graph, loss=loss, module=model, example_inputs=example_inputs,
        select=selector, output=plan.output, verbose=verbose,
    )
