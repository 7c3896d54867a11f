"""Any .onnx file -> onnx_ir graph with inferred shapes, normalised for matching and training."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from kronograph.errors import KronographError


def load_onnx(path: str | Path) -> ir.Model:
    """Read, check and shape-infer an ONNX file.

    Old files (IR version < 4) list their initializers as graph inputs too; those are removed from the
    inputs so that only data is left there.
    """
    path = Path(path)
    if not path.is_file():
        raise KronographError(f"model file not found: {path}; give the path of an existing .onnx file")
    try:
        proto = onnx.load(str(path))
    except Exception as error:
        raise KronographError(f"{path} is not a readable ONNX model ({type(error).__name__}); export it again") from error
    if not proto.graph.node:
        raise KronographError(f"{path} holds no ONNX graph (no nodes); pass an ONNX model file")
    try:
        onnx.checker.check_model(proto)
    except Exception as error:
        first = str(error).strip().splitlines()[0]
        raise KronographError(f"{path} is not a valid ONNX model ({first}); fix or re-export it") from error
    initializer_names = {init.name for init in proto.graph.initializer}
    data_inputs = [value for value in proto.graph.input if value.name not in initializer_names]
    if len(data_inputs) != len(proto.graph.input):
        del proto.graph.input[:]
        proto.graph.input.extend(data_inputs)
        proto.ir_version = max(proto.ir_version, 7)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:
        pass  # shapes help matching but are not required: a file with custom ops may not infer
    return ir.from_proto(proto)
