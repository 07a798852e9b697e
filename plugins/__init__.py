"""build-engine plugin room: one folder per fused plugin (schema, NumPy reference, Triton kernel, TensorRT
registration). Importing this package loads neither triton nor tensorrt."""
