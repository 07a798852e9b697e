"""Analysis stage: a read-only index of an ONNX graph (producers, consumers, constants, data-flow reachability).

Reachability follows *data* edges only: the input of a ``Shape`` or ``Size`` node is metadata, so a shape
computation does not make two tensors data-dependent (exporters derive masks and reshape targets from the
shapes of hidden states, which would otherwise tie unrelated parts of the graph together).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import onnx
from onnx import external_data_helper, numpy_helper

from calib.errors import GraphError

METADATA_OPS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class GraphIndex:
    """Nodes in topological order with producer/consumer maps. Node ids are positions in ``nodes``."""

    nodes: tuple[onnx.NodeProto, ...]
    producer: dict[str, int]
    consumers: dict[str, tuple[int, ...]]
    initializers: dict[str, onnx.TensorProto]
    constants: frozenset[str]  # initializers, outputs of Constant nodes and Identity chains over either
    aliases: dict[str, str]  # output of an Identity chain over a constant -> that constant

    @classmethod
    def build(cls, graph: onnx.GraphProto) -> GraphIndex:
        nodes = _topological(graph)
        producer: dict[str, int] = {}
        consumers: dict[str, list[int]] = {}
        for i, node in enumerate(nodes):
            for out in node.output:
                if out:
                    producer[out] = i
            for name in node.input:
                if name:
                    consumers.setdefault(name, []).append(i)
        initializers = {t.name: t for t in graph.initializer}
        constants = set(initializers)
        constants.update(o for n in nodes if n.op_type == "Constant" for o in n.output)
        aliases: dict[str, str] = {}
        for node in nodes:  # exporters deduplicate equal initializers behind Identity nodes
            if node.op_type == "Identity" and node.input and node.input[0] in constants:
                aliases[node.output[0]] = aliases.get(node.input[0], node.input[0])
                constants.add(node.output[0])
        return cls(
            nodes=nodes,
            producer=producer,
            consumers={k: tuple(v) for k, v in consumers.items()},
            initializers=initializers,
            constants=frozenset(constants),
            aliases=aliases,
        )

    def is_const(self, tensor: str) -> bool:
        return tensor in self.constants

    def data_inputs(self, i: int) -> tuple[str, ...]:
        """Non-constant, non-empty inputs of node ``i``."""
        return tuple(t for t in self.nodes[i].input if t and not self.is_const(t))

    def consumers_of(self, tensor: str) -> tuple[int, ...]:
        return self.consumers.get(tensor, ())

    def producer_of(self, tensor: str) -> int | None:
        return self.producer.get(tensor)

    def sole_consumer(self, tensor: str) -> int | None:
        users = self.consumers_of(tensor)
        return users[0] if len(users) == 1 else None

    def root(self, tensor: str) -> str:
        """The constant behind an Identity chain (``tensor`` itself when it is not one)."""
        return self.aliases.get(tensor, tensor)

    def const_shape(self, tensor: str) -> tuple[int, ...] | None:
        """Shape of an initializer (or of an Identity of one), or None."""
        init = self.initializers.get(self.root(tensor))
        return None if init is None else tuple(int(d) for d in init.dims)

    def const_dtype(self, tensor: str) -> int | None:
        """ONNX element type of an initializer (or of an Identity of one), or None; needs no weight data."""
        init = self.initializers.get(self.root(tensor))
        return None if init is None else int(init.data_type)

    def const_value(self, tensor: str) -> onnx.TensorProto | None:
        """The value of an initializer or a Constant node's ``value`` attribute, or None (also for an initializer
        whose data was left in an external file)."""
        tensor = self.root(tensor)
        if tensor in self.initializers:
            init = self.initializers[tensor]
            return None if external_data_helper.uses_external_data(init) else init  # values not loaded
        i = self.producer_of(tensor)
        if i is None or self.nodes[i].op_type != "Constant":
            return None
        value: onnx.TensorProto | None = next((a.t for a in self.nodes[i].attribute if a.name == "value"), None)
        return value

    def const_float(self, tensor: str) -> float | None:
        """A scalar (or one-element) constant as float, or None."""
        value = self.const_value(tensor)
        if value is None:
            return None
        array = numpy_helper.to_array(value)
        return float(array.reshape(-1)[0]) if array.size == 1 else None

    def ancestors(self, tensors: Iterable[str], within: frozenset[int] | None = None) -> frozenset[int]:
        """Nodes whose outputs reach ``tensors`` through data edges (optionally only inside ``within``)."""
        seen: set[int] = set()
        queue = deque(self.producer[t] for t in tensors if t in self.producer)
        while queue:
            i = queue.popleft()
            if i in seen or (within is not None and i not in within):
                continue
            seen.add(i)
            if self.nodes[i].op_type in METADATA_OPS:
                continue
            queue.extend(self.producer[t] for t in self.data_inputs(i) if t in self.producer)
        return frozenset(seen)

    def descendants(self, tensors: Iterable[str], within: frozenset[int] | None = None) -> frozenset[int]:
        """Nodes that consume ``tensors`` (transitively) through data edges (optionally only inside ``within``)."""
        seen: set[int] = set()
        queue = deque(c for t in tensors for c in self.consumers_of(t))
        while queue:
            i = queue.popleft()
            if i in seen or self.nodes[i].op_type in METADATA_OPS or (within is not None and i not in within):
                continue
            seen.add(i)
            queue.extend(c for out in self.nodes[i].output if out for c in self.consumers_of(out))
        return frozenset(seen)

    def between(self, source: str, sink: str) -> frozenset[int]:
        """Nodes on some data path from tensor ``source`` to tensor ``sink`` (the producer of ``sink`` included)."""
        return self.descendants([source]) & self.ancestors([sink])


def _topological(graph: onnx.GraphProto) -> tuple[onnx.NodeProto, ...]:
    """The nodes in a topological order (the file's order when it already is one)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    nodes = list(graph.node)
    if _is_sorted(nodes, set(available)):
        return tuple(nodes)
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output}
    pending = [sum(1 for t in set(n.input) if t in produced_by) for n in nodes]
    users: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for t in set(node.input):
            if t in produced_by:
                users.setdefault(produced_by[t], []).append(i)
    ready = deque(i for i, p in enumerate(pending) if p == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for j in users.get(i, []):
            pending[j] -= 1
            if pending[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        raise GraphError("the graph has a cycle; ONNX graphs must be acyclic")
    return tuple(nodes[i] for i in order)


def _is_sorted(nodes: list[onnx.NodeProto], available: set[str]) -> bool:
    for node in nodes:
        if any(t not in available for t in node.input if t):
            return False
        available.update(node.output)
    return True
