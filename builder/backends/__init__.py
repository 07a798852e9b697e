"""Engine-build stage: backends that turn a Q/DQ ONNX graph into a serialized engine.

``tensorrt`` (10.x/11.x) and ``tensorrt_rtx`` are imported lazily, only when a backend is instantiated.
"""
