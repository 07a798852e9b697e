"""Graph intake and analysis stage: ONNX model -> GraphReport."""
