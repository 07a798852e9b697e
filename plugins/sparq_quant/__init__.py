"""Fused QuantizeLinear + SPARQ plugin (schema, NumPy reference, Triton kernel, TensorRT registration).

Importing this package loads neither triton nor tensorrt; import ``kernel`` or ``plugin`` explicitly."""
