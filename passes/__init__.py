"""passes/: graph passes over the ONNX graph: layer matching (match/) and instrumentation (instrument)."""
