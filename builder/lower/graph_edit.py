"""Lowering stage: a small, deterministic ONNX graph editor shared by the lowering passes.

Passes add nodes and initializers with names derived from the tensors they touch (so the same plan always
gives the same graph), rewire consumers, and finish with a stable topological sort that keeps the original
node order wherever the data flow allows it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calib.errors import BuildError, InternalError

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


class GraphEditor:
    """Mutable view of one ModelProto (the caller passes a copy it owns)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self._names: set[str] = set()
        for node in self.graph.node:
            self._names.update(node.output)
            self._names.update(node.input)
            self._names.add(node.name)
        self._names.update(i.name for i in self.graph.initializer)
        self._names.update(i.name for i in self.graph.input)
        self._inits = {i.name: i for i in self.graph.initializer}

    # -- names -------------------------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        """``base`` if unused, else ``base_1``, ``base_2``, ... (deterministic)."""
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    # -- initializers --------------------------------------------------------------------------------------
    def initializer(self, name: str) -> np.ndarray | None:
        init = self._inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def add_initializer(self, base: str, array: np.ndarray) -> str:
        name = self.unique(base)
        tensor = numpy_helper.from_array(np.array(array, copy=True, order="C"), name)
        self.graph.initializer.append(tensor)
        self._inits[name] = self.graph.initializer[-1]
        return name

    def constant_value(self, tensor: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output (also behind Identity nodes), else None."""
        value = self.initializer(tensor)
        if value is not None:
            return value
        node = self.producer(tensor)
        if node is not None and node.op_type == "Identity" and node.input:
            return self.constant_value(node.input[0])  # exporters deduplicate initializers through Identity
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    # -- structure -------------------------------------------------------------------------------------------
    def node(self, name: str) -> onnx.NodeProto:
        for node in self.graph.node:
            if node.name == name:
                found: onnx.NodeProto = node
                return found
        raise BuildError(f"the model has no node named {name!r} (was the plan made for another model?)")

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        for node in self.graph.node:
            if tensor in node.output:
                found: onnx.NodeProto = node
                return found
        return None

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [node for node in self.graph.node if tensor in node.input]

    def is_graph_output(self, tensor: str) -> bool:
        return any(o.name == tensor for o in self.graph.output)

    def bias_add(self, node: onnx.NodeProto) -> tuple[onnx.NodeProto, str] | None:
        """The single ``Add`` reading ``node``'s output and its 1-D float32 bias initializer, if there is one
        (``MatMul -> Add(bias)``; None when the output has other readers or is a graph output)."""
        out = node.output[0]
        readers = self.consumers(out)
        if len(readers) != 1 or readers[0].op_type != "Add" or self.is_graph_output(out):
            return None
        add = readers[0]
        other = [t for t in add.input if t != out]
        bias = self._inits.get(other[0]) if len(other) == 1 else None
        if bias is None or bias.data_type != TensorProto.FLOAT or len(bias.dims) != 1:
            return None
        return add, other[0]

    def add_node(self, op_type: str, inputs: Iterable[str], outputs: Iterable[str], name: str,
                 domain: str = "", **attrs: object) -> onnx.NodeProto:
        node = helper.make_node(op_type, list(inputs), list(outputs), name=self.unique(name), domain=domain)
        node.attribute.extend(helper.make_attribute(key, value) for key, value in sorted(attrs.items()))
        self._names.update(node.output)
        self.graph.node.append(node)
        added: onnx.NodeProto = self.graph.node[-1]
        return added

    def inline_constant_aliases(self) -> int:
        """Make every node read the initializer behind an Identity chain directly, and drop the Identity nodes
        that nothing reads then; returns how many inputs were rewired.

        Exporters deduplicate equal weights through Identity nodes (a weight shared by several layers, as in
        ALBERT); analysis already sees through them (builder.graph.topology), so a plan names the initializer,
        and the lowering rules that rewrite a GEMM's weight find it as the GEMM's own input.
        """
        producers = {out: node for node in self.graph.node if node.op_type == "Identity" for out in node.output}

        def root(tensor: str) -> str | None:
            for _ in range(len(producers) + 1):
                if tensor in self._inits:
                    return tensor
                node = producers.get(tensor)
                if node is None or not node.input:
                    return None
                tensor = node.input[0]
            return None

        rewired = 0
        for node in self.graph.node:
            for i, tensor in enumerate(node.input):
                found = root(tensor) if tensor in producers else None
                if found is not None:
                    node.input[i] = found
                    rewired += 1
        kept = {o.name for o in self.graph.output}
        while True:
            read = {t for node in self.graph.node for t in node.input} | kept
            dead = [n for n in self.graph.node if n.op_type == "Identity" and n.output[0] not in read
                    and root(n.output[0]) is not None]
            if not dead:
                return rewired
            for node in dead:
                self.graph.node.remove(node)

    def remove_node(self, node: onnx.NodeProto) -> None:
        self.graph.node.remove(node)

    @staticmethod
    def replace_input(node: onnx.NodeProto, old: str, new: str) -> None:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new

    def redirect(self, consumers: Iterable[str], old: str, new: str) -> None:
        """Make the nodes named ``consumers`` read ``new`` where they read ``old`` (each must read ``old``)."""
        for name in consumers:
            node = self.node(name)
            if old not in node.input:
                raise BuildError(f"plan says node {name!r} reads {old!r}, but it does not")
            self.replace_input(node, old, new)

    def rename_output(self, old: str, new: str) -> None:
        """Make the producer of ``old`` write ``new`` instead (consumers are not touched)."""
        producer = self.producer(old)
        if producer is None:
            raise InternalError(f"tensor {old!r} has no producer node")
        for i, name in enumerate(producer.output):
            if name == old:
                producer.output[i] = new

    def finish(self) -> None:
        """Stable topological sort (original order where possible) and removal of unused initializers."""
        nodes = list(self.graph.node)
        available = {i.name for i in self.graph.input} | set(self._inits) | {""}
        producers: dict[str, int] = {}
        for index, node in enumerate(nodes):
            for out in node.output:
                producers[out] = index
        waiting = [0] * len(nodes)
        users: dict[int, list[int]] = {}
        for index, node in enumerate(nodes):
            deps = {producers[t] for t in node.input if t not in available and t in producers}
            waiting[index] = len(deps)
            for dep in deps:
                users.setdefault(dep, []).append(index)
        ready = [i for i, w in enumerate(waiting) if w == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            index = heapq.heappop(ready)
            order.append(index)
            for user in users.get(index, []):
                waiting[user] -= 1
                if waiting[user] == 0:
                    heapq.heappush(ready, user)
        if len(order) != len(nodes):
            raise InternalError("lowering produced a cycle in the graph")
        del self.graph.node[:]
        self.graph.node.extend(nodes[i] for i in order)
        used = {t for node in self.graph.node for t in node.input}
        keep = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        self._inits = {i.name: i for i in self.graph.initializer}
