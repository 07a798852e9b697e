"""Profiling stage: latency of ONNX Runtime sessions and TensorRT engines -> LatencyReport (JSON + PNG)."""
