"""Model intake stage: bring a model in as ONNX (the bundled MiniLM export, or any user ONNX file)."""
