"""runtime/engines: what runs a compiled model's passes for K-FAC.

- ``torch``: ``TorchEngine``, the user's own nn.Module (parameters shared, updated in place).
- ``onnxruntime``: ``OnnxRuntimeEngine``, an ONNX graph on onnxruntime-training; each step returns the
  loss, every site's activation and pre-activation gradient (the K-FAC taps) and the parameter gradients,
  and the engine reads, writes and exports the weights.
- ``onnxruntime_passes``: ``OnnxRuntimePasses``, the TorchEngine's verbs on that engine (sampled-target
  statistics, Fisher products by differences), so that ``kronograph.optim.KFAC`` runs on both.
"""

from kronograph.runtime.engines.onnxruntime import OnnxRuntimeEngine, StepResult

__all__ = ["OnnxRuntimeEngine", "StepResult"]
