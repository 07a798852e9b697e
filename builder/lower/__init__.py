"""Lowering stage: passes that turn a QuantPlan into a Q/DQ ONNX graph (portable or plugin variant)."""
