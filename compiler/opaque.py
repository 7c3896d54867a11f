"""Operations torch.onnx has no ONNX function for, written as opaque nodes so that the graph can still be read.

kronograph reads a module's layers from its ONNX graph; the torch engine trains the module itself. An operation
without an ONNX function (``torch.linalg.matrix_exp`` in an orthogonal parametrization, ``torch.linalg.solve``)
would stop the export, although only the graph's shape matters to the plan. Such an operation is written as one
node of the ``kronograph.opaque`` domain, named after the operation, its tensor arguments as inputs and one
output per tensor it returns, with the shapes and dtypes torch.export traced: the weights computed through it are
not a layer's own initializer, so they get no Kronecker block and step as the parameters outside every block.
onnxruntime cannot run such a graph: the onnxruntime engine and ``export_onnx`` refuse it by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import onnx_ir as ir
import torch
from onnx import defs
from torch.utils import _pytree as pytree

from kronograph.errors import KronographError

DOMAIN = "kronograph.opaque"


class OpaqueOperationWarning(UserWarning):
    """compile wrote an operation without an ONNX function as an opaque node (the torch engine trains the model;
    the weights computed through it get no Kronecker block)."""


#: Every ONNX tensor type: an opaque node takes and returns tensors of any.
_TENSOR_TYPES = [f"tensor({name})" for name in (
    "float", "double", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
    "uint64", "bool", "complex64", "complex128")]


def missing_operation(message: str) -> torch._ops.OpOverload | None:
    """The operation an export error says has no ONNX function (torch.onnx's "No ONNX function found for
    <OpOverload(op='aten.linalg_matrix_exp', overload='default')>"), or None."""
    found = re.search(r"No ONNX function found for <OpOverload\(op='(\w+)\.([\w.]+)', overload='(\w+)'\)>", message)
    if found is None:
        return None
    namespace, name, overload = found.groups()
    try:
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except AttributeError:
        return None


def translation(op: torch._ops.OpOverload) -> Callable | None:
    """A torch.onnx translation of ``op`` into one opaque node, for ``custom_translation_table``; None where ``op``
    returns anything but tensors (a list, a number: no fixed count of outputs to declare)."""
    returns = op._schema.returns
    if not returns or any(str(r.type) != "Tensor" for r in returns):
        return None
    name = f"{op._schema.name.split('::')[-1]}.{op._overloadname}"
    _register(name, len(returns))

    def opaque(*args, **kwargs):
        from onnxscript.values import Opset

        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if _is_symbolic(a)]
        return getattr(Opset(DOMAIN, 1), name)(*tensors)

    return opaque


def opaque_nodes(graph: ir.Model) -> list[str]:
    """The operations written as opaque nodes in ``graph`` (its main graph and functions), in order, once each."""
    names = [node.op_type for node in ir.traversal.RecursiveGraphIterator(graph.graph) if node.domain == DOMAIN]
    return list(dict.fromkeys(names))


def refuse_opaque(graph: ir.Model, what: str) -> None:
    """KronographError where ``graph`` holds opaque nodes, which onnxruntime cannot run (``what`` would)."""
    names = opaque_nodes(graph)
    if names:
        raise KronographError(
            f"forward() calls {', '.join(names)}, which torch.onnx has no ONNX function for; {what} needs the ONNX "
            "graph to run it: train on the torch engine (compile's default), or write that part with operations "
            "ONNX has")


def _register(name: str, outputs: int) -> None:
    """The ONNX schema of an opaque node (the exporter builds a node only from a registered schema): any tensors
    in, ``outputs`` tensors out."""
    try:
        defs.get_schema(name, 1, DOMAIN)
        return  # registered by an earlier export in this process
    except defs.SchemaError:
        pass
    parameter = defs.OpSchema.FormalParameter
    variadic = defs.OpSchema.FormalParameterOption.Variadic
    schema = defs.OpSchema(
        name, DOMAIN, 1,
        inputs=[parameter("inputs", "T", param_option=variadic, is_homogeneous=False, min_arity=0)],
        outputs=[parameter(f"output_{i}", f"U{i}") for i in range(outputs)],
        type_constraints=[("T", _TENSOR_TYPES, ""), *((f"U{i}", _TENSOR_TYPES, "") for i in range(outputs))])
    defs.register_schema(schema)


def _is_symbolic(value) -> bool:
    """Whether an argument the exporter hands a translation is a tensor of the graph (not a number, None, ...)."""
    return isinstance(value, ir.Value)
