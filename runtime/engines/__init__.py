"""runtime/engines: what runs a compiled model's passes for every method (K-FAC, K-BFGS, the baselines).

- ``torch``: ``TorchEngine``, the user's own nn.Module (parameters shared, updated in place).
- ``onnxruntime``: ``OnnxRuntimeEngine``, an ONNX graph on onnxruntime-training; each step returns the
  loss, every site's activation and pre-activation gradient (the K-FAC taps) and the parameter gradients,
  and the engine reads, writes and exports the weights.
- ``onnxruntime_passes``: ``OnnxRuntimePasses``, the TorchEngine's verbs on that engine (sampled-target
  statistics, Fisher products by differences), so that ``kronograph.optim.KFAC`` runs on both.
"""

from kronograph.runtime.engines.onnxruntime import OnnxRuntimeEngine, StepResult
from kronograph.runtime.engines.onnxruntime_passes import OnnxRuntimePasses
from kronograph.runtime.engines.torch import TorchEngine


def make_engine(compiled, loss, products: str = "forward", fsdp: bool = False) -> TorchEngine | OnnxRuntimePasses:
    """The engine that runs a compiled model's passes for every method: its own module (torch) or
    onnxruntime-training. ``products`` chooses the torch engine's J d (onnxruntime has only central differences);
    ``fsdp``: the method steps an FSDP2-sharded module inside ``TorchEngine.stepping`` (else one is refused)."""
    if compiled.engine == "torch":
        return TorchEngine(compiled, loss, products, fsdp)
    return OnnxRuntimePasses(compiled, loss)


__all__ = ["OnnxRuntimeEngine", "OnnxRuntimePasses", "StepResult", "TorchEngine", "make_engine"]
