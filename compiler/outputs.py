"""Which of a model's outputs the loss is put on: the ``output=`` choice of ``kronograph.compile``.

Models people bring return a tensor, a tuple, a dict or a Hugging Face ``ModelOutput`` (a dict that also
indexes by position). ``output`` picks the tensor the loss is computed on:

* None (the default): a tensor as it is; the ``"logits"`` entry of a dict or ModelOutput (an error lists the
  keys of one without it); element 0 of a tuple or list.
* a str: that key; an int: that position; a callable: ``output(model_outputs) -> tensor``.

``OutputSelector`` resolves the choice once on the example batch, says in words what it picks (``cm.output``)
and where that tensor sits among the exported graph's outputs (torch.export flattens the outputs in pytree
order), so that the onnxruntime engine puts its loss on the same tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from kronograph.compiler.export import kept_state
from kronograph.errors import KronographError

OutputChoice = str | int | Callable[[Any], torch.Tensor] | None


class OutputSelector:
    """``select(outputs)`` returns the tensor chosen by ``output``; ``description`` says which."""

    def __init__(self, output: OutputChoice, example: Any) -> None:
        if not (output is None or isinstance(output, (str, int)) or callable(output)):
            raise KronographError(f"output={output!r}; pass a key (str), a position (int) or a callable")
        self.output = output
        chosen = self.select(example)
        self.description = _describe(output, example)
        leaves = [leaf for leaf in pytree.tree_leaves(example) if isinstance(leaf, torch.Tensor)]
        self.graph_index = next((i for i, leaf in enumerate(leaves) if leaf is chosen), None)

    def __call__(self, outputs: Any) -> torch.Tensor:
        return self.select(outputs)

    def select(self, outputs: Any) -> torch.Tensor:
        if callable(self.output) and not isinstance(self.output, (str, int)):
            chosen = self.output(outputs)
        elif isinstance(outputs, torch.Tensor):
            if self.output is not None:
                raise KronographError(f"output={self.output!r}, but the model returns a single tensor; drop output=")
            chosen = outputs
        elif isinstance(outputs, Mapping):
            key = "logits" if self.output is None else self.output
            if isinstance(key, int):
                keys = list(outputs)
                if not -len(keys) <= key < len(keys):
                    raise KronographError(f"output={key}, but the model returns {len(keys)} outputs {keys}")
                key = keys[key]
            if key not in outputs:
                raise KronographError(
                    f"the model returns {type(outputs).__name__} with keys {list(outputs)} and no {key!r}; "
                    f"pass output='<key>' to compile (the tensor the loss is put on)"
                )
            chosen = outputs[key]
        elif isinstance(outputs, (tuple, list)):
            index = 0 if self.output is None else self.output
            if not isinstance(index, int):
                raise KronographError(f"output={index!r}, but the model returns a {type(outputs).__name__}; pass a position")
            if not -len(outputs) <= index < len(outputs):
                raise KronographError(f"output={index}, but the model returns {len(outputs)} outputs")
            chosen = outputs[index]
        else:
            raise KronographError(
                f"the model returns a {type(outputs).__name__}; pass output=callable to compile, returning the tensor "
                "the loss is put on"
            )
        if not isinstance(chosen, torch.Tensor):
            raise KronographError(
                f"the chosen output is a {type(chosen).__name__}, not a tensor; pass output= naming the logits"
            )
        return chosen


def _describe(output: OutputChoice, example: Any) -> str:
    kind = type(example).__name__
    if isinstance(example, torch.Tensor):
        return "the model's output tensor"
    if output is None:
        return f"'logits' of the model's {kind}" if isinstance(example, Mapping) else f"element 0 of the model's {kind}"
    if isinstance(output, (str, int)):
        return f"{output!r} of the model's {kind}"
    return f"{getattr(output, '__name__', 'output')}(the model's {kind})"


def example_outputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], *watching: Any) -> Any:
    """The model's outputs on the example batch, computed without gradients and with its state (batch-norm
    running statistics) put back afterwards; ``watching``: TorchFunctionModes that see the forward's calls alone."""
    with kept_state(model), torch.no_grad(), contextlib.ExitStack() as stack:
        for mode in watching:
            stack.enter_context(mode)
        return model(*inputs)


def put_first(graph: Any, index: int | None) -> None:
    """Make graph output ``index`` (of an onnx_ir graph) the first: the one the onnxruntime engine's loss takes."""
    outputs = list(graph.graph.outputs)
    if index is None or index == 0 or index >= len(outputs):
        return
    graph.graph.outputs.clear()
    graph.graph.outputs.extend([outputs[index], *outputs[:index], *outputs[index + 1:]])
