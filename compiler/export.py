"""PyTorch module -> ONNX graph, through torch.export (the dynamo exporter).

Why this exporter: it names every initializer by the module's own state_dict key, it keeps the module
path of every node in metadata, and with ``optimize=False`` it leaves weight Transposes as ops instead of
folding them into anonymous constants and batch norm as its own BatchNormalization node instead of
folding it into the convolution. That node is written in its inference form (running statistics);
passes/instrument switches it to batch statistics for training on onnxruntime.
The TorchScript exporter is deprecated and renames initializers (``onnx::MatMul_123``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import numpy_helper
from torch.overrides import TorchFunctionMode

from kronograph.compiler.opaque import OpaqueOperationWarning, missing_operation, translation
from kronograph.compiler.recurrent import RecurrentCalls
from kronograph.errors import KronographError


def _batch_dynamic_shapes(example_inputs: Sequence[torch.Tensor]):
    """Let the exporter keep the batch axis symbolic where the model allows it."""
    return tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)


def _innermost(error: BaseException) -> BaseException:
    """The real reason, which the exporter wraps in several layers of exceptions."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _root_cause(error: BaseException) -> str:
    """The innermost exception's first line."""
    error = _innermost(error)
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


#: The operations torch.nn.utils.parametrizations.orthogonal computes its weight with, one per orthogonal_map.
_ORTHOGONAL_MAPS = frozenset({"aten.linalg_matrix_exp", "aten._linalg_solve_ex", "aten.linalg_householder_product"})


def _hint_for(op: str) -> str:
    """Where a model usually calls ``op`` (an operation without an ONNX function), or nothing."""
    if op == "aten._linalg_check_errors":  # torch.linalg.solve's check, as a side effect of the traced graph
        return (" (torch.linalg.solve checks its result with it: torch.nn.utils.parametrizations.orthogonal with "
                "orthogonal_map='cayley' calls it; its 'matrix_exp' and 'householder' maps compile)")
    if op in _ORTHOGONAL_MAPS:
        return (" (torch.nn.utils.parametrizations.orthogonal computes its weight with it: for an inference file, "
                "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') keeps the weight it computes)")
    return ""


def _raised_in(error: BaseException) -> set[str]:
    """The names of the functions on the innermost exception's traceback (where in the model it was raised)."""
    return {frame.name for frame in traceback.extract_tb(_innermost(error).__traceback__)}


#: nn.Transformer and its encoder / decoder compare a mask with a causal one when not told whether it is: a
#: branch on the mask's values.
_CAUSAL_MASK_HINT = (
    " (here nn.Transformer's own check of whether a mask is causal: pass the flag, e.g. tgt_is_causal=True with a "
    "causal tgt_mask, src_is_causal / memory_is_causal likewise, is_causal for nn.TransformerEncoder)")


class _FourDimensionalAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on query, key and value of other than 4 dims (a single head's [batch, T,
    d], or several batch axes), which PyTorch computes but torch.onnx writes only for [batch, heads, T, d], traced
    as the same attention on 4-D views: the graph computes the same values (the module itself is not changed)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and len(args) >= 3:
            query, key, value = args[:3]
            if all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (query, key, value)) \
                    and {query.dim(), key.dim(), value.dim()} != {4} \
                    and query.shape[:-2] == key.shape[:-2] == value.shape[:-2]:  # (not broadcast batch axes)
                mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
                if mask is None or mask.dim() <= 2:  # a [T, S] mask broadcasts over the 4-D views too
                    def four(t: torch.Tensor) -> torch.Tensor:
                        return t.reshape(-1, 1, *t.shape[-2:])

                    out = func(four(query), four(key), four(value), *args[3:], **kwargs)
                    return out.reshape(*query.shape[:-1], value.shape[-1])
        return func(*args, **kwargs)


# The exporter's, torch.export's and torch.fx's loggers: "torchvision is not installed. Skipping
# torchvision::nms" (four lines per export where torchvision is absent), torch.export's error log and the
# symbolic-shape warnings come through them; the graph dumps of a failed trace go to sys.stderr.
_EXPORT_LOGGERS = ("torch.export", "torch.onnx", "torch.fx")


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines, graph dumps, warnings and log lines (kronograph's error says why;
    ``verbose=True``, on the command line ``kronograph --verbose``, shows them)."""
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@functools.cache
def _onnx_registry():
    """torch.onnx's private registry class and its classmethod that builds one, imported on the first export (not
    with kronograph: ~0.7 s); None where its layout differs, and then every export builds its own, as torch's does."""
    try:
        from torch.onnx._internal.exporter import _constants
        from torch.onnx._internal.exporter._registration import ONNXRegistry

        build = ONNXRegistry.__dict__["from_torchlib"]
        if isinstance(build, classmethod) and isinstance(ONNXRegistry().functions, dict) \
                and isinstance(_constants.TORCHLIB_OPSET, int):
            return ONNXRegistry, build, _constants.TORCHLIB_OPSET
    except (ImportError, KeyError, AttributeError, TypeError):
        pass
    return None


@functools.cache
def _built_registry(opset_version: int):
    registry_class, build, _ = _onnx_registry()
    return build.__func__(registry_class, opset_version)


def _registry_copy(cls, opset_version: int | None = None):
    """A copy of the registry built once per process and opset (its lists copied: an export may add to them)."""
    built = _built_registry(_onnx_registry()[2] if opset_version is None else opset_version)
    registry = copy.copy(built)
    registry.functions = {target: list(metas) for target, metas in built.functions.items()}
    return registry


@contextlib.contextmanager
def _reused_registry():
    """torch.onnx rebuilds its table of ~1100 ONNX functions from onnxscript for every export, several times: ~2 s
    on CPU-2, over half of compiling a small MLP. Inside, each export gets a copy of one table built once per
    process; torch's own classmethod is put back on the way out."""
    found = _onnx_registry()
    if found is None:
        yield
        return
    registry_class, build, _ = found
    registry_class.from_torchlib = classmethod(_registry_copy)
    try:
        yield
    finally:
        registry_class.from_torchlib = build


@contextlib.contextmanager
def kept_state(model: torch.nn.Module):
    """Running or tracing the model in training mode inside must not move batch-norm running statistics or any
    other entry of its state_dict: they are put back on the way out."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for key, value in model.state_dict().items():
                value.copy_(state[key])


def export_module(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], verbose: bool = False) -> ir.Model:
    """Trace ``model`` on ``example_inputs`` and return the ONNX graph (onnx_ir) without changing the model.
    ``verbose`` shows the exporter's own output (see ``_export``). An operation without an ONNX function becomes
    an opaque node (compiler/opaque.py): the graph is read for its layers, the torch engine runs the module.

    Raises:
        KronographError: when the exporter cannot trace the model; the message carries its reason.
    """
    if not isinstance(model, torch.nn.Module):
        raise KronographError(f"expected a torch.nn.Module, got {type(model).__name__}; pass a module or an .onnx path")
    inputs = tuple(example_inputs)
    if not inputs:
        raise KronographError("example_inputs is empty; pass example_inputs=(x,) with a batch the model accepts")
    with kept_state(model):
        try:
            return _export(model, inputs, optimize=False, verbose=verbose, opaque=True).model
        except KronographError:
            if _packs_sequences(model, inputs):
                raise KronographError(
                    "forward() packs its sequences (nn.utils.rnn.pack_padded_sequence or pack_sequence), whose "
                    "batch sizes come from the lengths' values: torch.export cannot trace that. Run the RNN on the "
                    "padded batch instead and read each sequence's last valid output with torch.gather at "
                    "lengths - 1 (the RNN's maps then get Kronecker blocks)"
                ) from None
            raise


def _packs_sequences(model: torch.nn.Module, inputs: tuple) -> bool:
    """Whether the model's forward on ``inputs`` runs a recurrent layer on a packed sequence (asked only once the
    exporter has failed; the random generators and the state_dict are left as they were)."""
    calls = RecurrentCalls()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), calls:
            model(*inputs)
    except Exception:  # noqa: S110 - a forward that fails here leaves the exporter's own error to stand
        pass
    return calls.packed


def export_inference(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: Path,
                     verbose: bool = False) -> None:
    """Write ``model`` in eval mode (batch norm from running statistics) as an .onnx file.

    Not through the exporter's optimiser: it folds constant parameters away (an all-zero bias vanishes
    from its Gemm), and a file that is trained further needs every parameter. onnxruntime optimises the
    graph when it loads it anyway."""
    was_training = model.training
    model.eval()
    try:
        _export(model, tuple(example_inputs), optimize=False, verbose=verbose).save(str(path))
    finally:
        model.train(was_training)


def write_graph(graph: ir.Model, path: Path, weights: Mapping[str, np.ndarray] | None = None) -> Path:
    """Save ``graph`` as an .onnx file that onnxruntime 1.19 loads (IR version capped), with ``weights``
    (initializer name -> array) in place of the stored initializers where given."""
    from kronograph.passes.instrument import ORT_MAX_IR_VERSION

    proto = ir.to_proto(graph)
    for initializer in proto.graph.initializer:
        if weights and initializer.name in weights:
            initializer.CopyFrom(numpy_helper.from_array(weights[initializer.name], initializer.name))
    proto.ir_version = min(proto.ir_version, ORT_MAX_IR_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def _export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], optimize: bool, verbose: bool = False,
            opaque: bool = False):
    """Quiet unless ``verbose``: then the exporter's warnings, log lines and graph dumps reach the user as torch
    writes them, and its progress lines too, moved to stderr so that stdout stays the command's output (JSON).
    ``opaque``: an operation without an ONNX function is written as an opaque node (compiler/opaque.py), with an
    OpaqueOperationWarning, instead of failing the export."""
    table: dict = {}
    while True:
        try:
            with contextlib.redirect_stdout(sys.stderr) if verbose else _quiet(), _reused_registry(), \
                    _FourDimensionalAttention():
                program = torch.onnx.export(
                    model,
                    inputs,
                    dynamo=True,
                    optimize=optimize,
                    verbose=verbose,
                    dynamic_shapes=_batch_dynamic_shapes(inputs),
                    report=False,
                    custom_translation_table=table or None,
                )
        except Exception as error:  # the exporter raises many types; all mean "cannot trace this model"
            missing = missing_operation(str(_innermost(error)))
            written = None if missing is None or not opaque or missing in table else translation(missing)
            if written is None:
                raise _export_error(error) from error
            table[missing] = written
            continue
        if table:
            names = ", ".join(op._schema.name.replace("::", ".") for op in table)
            warnings.warn(f"forward() calls {names}, which torch.onnx has no ONNX function for: compiled as an opaque "
                          "node, so the weights computed through it get no Kronecker block (they step as the "
                          "parameters outside every block) and only the torch engine can train the model",
                          OpaqueOperationWarning, stacklevel=4)
        return program


def _export_error(error: BaseException) -> KronographError:
    """The KronographError that names why torch.onnx.export failed and the fix."""
    if "DataDependent" in _root_cause(error) or "data-dependent" in str(error):
        hint = _CAUSAL_MASK_HINT if "_detect_is_causal_mask" in _raised_in(error) else ""
        return KronographError(
            f"forward() branches on the values of a tensor ({_root_cause(error)}), which torch.export cannot "
            f"trace{hint}; write the branch with torch.where or torch.cond, or compile an .onnx file of the model")
    if "Cache" in str(error) and "in output" in str(error):
        return KronographError(
            f"the model returns a key/value cache ({_root_cause(error)}); training needs no cache: set "
            "model.config.use_cache = False (Hugging Face models) before kronograph.compile")
    missing = re.search(r"(?:No ONNX function found for |OpOverload\.name of )<OpOverload\(op='([\w.]+)'",
                        str(_innermost(error)))
    if missing:
        return KronographError(
            f"forward() calls {missing.group(1)}, which torch.onnx cannot write as ONNX (no ONNX function for "
            f"it){_hint_for(missing.group(1))}: compute that part outside the module (pass its result as an "
            "input), or write it with operations ONNX has")
    return KronographError(
        f"torch.onnx.export could not trace the model ({_root_cause(error)}); check that example_inputs "
        "match forward() and that forward() is traceable by torch.export")
