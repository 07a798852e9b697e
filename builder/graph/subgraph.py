"""Graph analysis stage (a helper the weight stage runs models with): the part of a model that computes some tensors.

Data-aware weight passes (empirical bias correction, GPFQ's layer-by-layer inputs) run a model only up to the
tensors they read; ONNX Runtime then neither computes nor keeps the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx


def truncated(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that computes only ``tensors``: the nodes they depend on, with those tensors as outputs
    (the graph inputs and initializers those nodes read, the same opsets, functions and IR version)."""
    graph = model.graph
    producers = {o: i for i, n in enumerate(graph.node) for o in n.output}
    keep: set[int] = set()
    stack = [producers[t] for t in tensors if t in producers]
    while stack:
        index = stack.pop()
        if index not in keep:
            keep.add(index)
            stack.extend(producers[t] for t in graph.node[index].input if t in producers)
    needed = {t for i in keep for t in graph.node[i].input}
    work = onnx.helper.make_graph([graph.node[i] for i in sorted(keep)], graph.name,
                                  [v for v in graph.input if v.name in needed],
                                  [onnx.helper.make_empty_tensor_value_info(t) for t in tensors],
                                  initializer=[t for t in graph.initializer if t.name in needed])
    out = onnx.helper.make_model(work, opset_imports=list(model.opset_import), functions=list(model.functions))
    out.ir_version = model.ir_version
    return out
