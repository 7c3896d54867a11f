"""runtime/engines: the backends that run a compiled model's training step outside the user's torch module.

- ``onnxruntime``: ``OnnxRuntimeEngine``, an .onnx model trained on onnxruntime-training; each step returns
  the loss, every site's activation and pre-activation gradient (the K-FAC taps) and the parameter
  gradients, and the engine reads, writes and exports the weights.
- ``kfac_onnxruntime``: ``OnnxKFAC``, K-FAC on that engine (empirical Fisher, no re-scaling yet).
"""

from kronograph.runtime.engines.onnxruntime import OnnxRuntimeEngine, StepResult

__all__ = ["OnnxRuntimeEngine", "StepResult"]
