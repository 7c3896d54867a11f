"""PyTorch module -> ONNX graph, through torch.export (the dynamo exporter).

Why this exporter: it names every initializer by the module's own state_dict key, it keeps the module
path of every node in metadata, and with ``optimize=False`` it leaves weight Transposes as ops instead of
folding them into anonymous constants. The model is traced in its current mode; in training mode batch
norm stays a BatchNormalization with batch statistics instead of being folded into the convolution.
The TorchScript exporter is deprecated and renames initializers (``onnx::MatMul_123``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence

import onnx_ir as ir
import torch

from kronograph.errors import KronographError


def _batch_dynamic_shapes(example_inputs: Sequence[torch.Tensor]):
    """Let the exporter keep the batch axis symbolic where the model allows it."""
    return tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)


def export_module(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor]) -> ir.Model:
    """Trace ``model`` on ``example_inputs`` and return the ONNX graph (onnx_ir) without changing the model.

    Raises:
        KronographError: when the exporter cannot trace the model; the message carries its reason.
    """
    if not isinstance(model, torch.nn.Module):
        raise KronographError(f"expected a torch.nn.Module, got {type(model).__name__}; pass a module or an .onnx path")
    inputs = tuple(example_inputs)
    if not inputs:
        raise KronographError("example_inputs is empty; pass example_inputs=(x,) with a batch the model accepts")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                inputs,
                dynamo=True,
                optimize=False,
                verbose=False,
                dynamic_shapes=_batch_dynamic_shapes(inputs),
                report=False,
            )
    except Exception as error:  # the exporter raises many types; all mean "cannot trace this model"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KronographError(
            f"torch.onnx.export could not trace the model ({first_line}); check that example_inputs match "
            "forward() and that forward() is traceable by torch.export"
        ) from error
    finally:
        # Tracing in training mode must not move batch-norm running statistics or any other buffer.
        with torch.no_grad():
            for key, value in model.state_dict().items():
                value.copy_(state[key])
    return program.model
