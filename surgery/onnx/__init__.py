"""ONNX export and its checks (onnxruntime sessions, validation, benchmarks)."""
