"""Precision search (evaluation side): run a candidate graph as a chain of segments cut at the residual stream.

Every candidate of one search is the same model with a different set of FP16 islands, so most candidates share
their first layers with a candidate evaluated before. The graph is cut at the residual-stream tensors (the
outputs of the residual ``Add`` nodes the analysis names, which lowering keeps by name):

    inputs -> [segment 0] -> r_0 -> [segment 1] -> r_1 -> ... -> r_K -> [segment K+1] -> outputs

Segment k holds the nodes needed for r_k that no earlier segment holds; its *state* is every tensor an earlier
segment produced that a later one (or the caller) still reads (the stream itself, the attention mask, shape
tensors). Each segment has a key: a hash of the previous key and of its own nodes and initializer bytes. Two
candidates whose segments 0..k hash alike compute the same state after segment k, so the state is cached per
key (least recently used first out, within a byte budget) and a candidate runs only the segments after its
longest cached prefix. Every candidate runs as the same chain of segments whether or not its prefix is
cached, so a cached prefix gives figures bit-identical to a fresh run.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from calib.errors import GraphError

logger = logging.getLogger(__name__)

State = dict[str, npt.NDArray[Any]]


@dataclass(frozen=True, kw_only=True)
class Segment:
    """One piece of the chain: its nodes as a standalone model, what it reads and what it hands on."""

    index: int
    key: str  # hash of the previous segment's key and this segment's content
    nodes: tuple[onnx.NodeProto, ...]  # in graph (topological) order
    initializers: tuple[onnx.TensorProto, ...]
    reads: tuple[onnx.ValueInfoProto, ...]  # graph inputs and earlier segments' tensors
    writes: tuple[onnx.ValueInfoProto, ...]  # tensors produced here that later segments or the caller read
    live: frozenset[str]  # the state after this segment (every tensor still read later), graph inputs excluded
    opsets: tuple[onnx.OperatorSetIdProto, ...]
    ir_version: int

    @property
    def read_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.reads)

    @property
    def write_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.writes)

    def model(self) -> onnx.ModelProto:
        """The segment as a standalone model (built on demand: it copies the segment's initializers)."""
        graph = helper.make_graph(list(self.nodes), f"segment{self.index}", list(self.reads), list(self.writes),
                                  list(self.initializers))
        return helper.make_model(graph, opset_imports=list(self.opsets), ir_version=self.ir_version)


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def _ancestors(graph: onnx.GraphProto, producers: Mapping[str, int], tensors: Iterable[str]) -> set[int]:
    seen: set[int] = set()
    stack = [producers[t] for t in tensors if t in producers]
    while stack:
        index = stack.pop()
        if index in seen:
            continue
        seen.add(index)
        stack.extend(producers[t] for t in graph.node[index].input if t in producers)
    return seen


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of every tensor, by shape inference over a copy without initializer data."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    graph = skeleton.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    known = {i.name for i in model.graph.input}
    for init in model.graph.initializer:  # shapes and types only: inference needs no weights for element types
        if init.name not in known:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    types: dict[str, int] = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in model.graph.node for a in node.attribute)


def _value_info(name: str, types: Mapping[str, int]) -> onnx.ValueInfoProto:
    if name not in types:
        raise GraphError(f"cannot cut the graph at tensor {name!r}: its element type is unknown")
    return helper.make_tensor_value_info(name, types[name], None)


def _digest(previous: str, nodes: Sequence[onnx.NodeProto], inits: Sequence[onnx.TensorProto],
            reads: Sequence[str]) -> str:
    digest = hashlib.sha256(previous.encode())
    digest.update(repr(list(reads)).encode())
    for node in nodes:
        digest.update(node.SerializeToString(deterministic=True))
    for init in inits:
        digest.update(init.SerializeToString(deterministic=True))
    return digest.hexdigest()


def split_model(model: onnx.ModelProto, cuts: Sequence[str], outputs: Sequence[str]) -> list[Segment]:
    """The chain of segments of ``model`` cut after each tensor of ``cuts`` (in order; absent ones are skipped).

    A graph with control-flow subgraphs is not cut (one segment), since its inner graphs may read any tensor.
    """
    graph = model.graph
    producers = _producers(graph)
    present = [c for c in cuts if c in producers] if not _has_subgraphs(model) else []
    targets: list[list[str]] = [[c] for c in present] + [list(outputs)]
    owner: dict[int, int] = {}
    for seg, tensors in enumerate(targets):
        for index in _ancestors(graph, producers, tensors):
            owner.setdefault(index, seg)
    types = _element_types(model)
    inits = {i.name: i for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    members: list[list[int]] = [[] for _ in targets]
    for index in sorted(owner):  # graph order is topological
        members[owner[index]].append(index)
    read_later: list[set[str]] = [set() for _ in targets]  # tensors read by segments after k (or the caller)
    pending = set(outputs)
    for seg in range(len(targets) - 1, -1, -1):
        read_later[seg] = set(pending)
        for index in members[seg]:
            pending.update(t for t in graph.node[index].input if t and t not in inits)
    segments: list[Segment] = []
    key = hashlib.sha256(repr([(i.name, i.type.SerializeToString()) for i in graph.input]).encode()).hexdigest()
    available: set[str] = set(graph_inputs)
    for seg, indices in enumerate(members):
        nodes = [graph.node[i] for i in indices]
        made = {t for n in nodes for t in n.output if t}
        reads = sorted({t for n in nodes for t in n.input if t and t not in inits and t not in made})
        missing = [t for t in reads if t not in available]
        if missing:
            raise GraphError(f"segment {seg} reads {missing[0]!r}, which no earlier segment produces")
        used = sorted({t for n in nodes for t in n.input if t in inits})
        writes = sorted(t for t in made if t in read_later[seg])
        available |= made
        live = frozenset(t for t in available - graph_inputs if t in read_later[seg])
        weights = tuple(inits[t] for t in used)
        key = _digest(key, nodes, weights, reads)
        segments.append(Segment(index=seg, key=key, nodes=tuple(nodes), initializers=weights,
                                reads=tuple(_value_info(t, types) for t in reads),
                                writes=tuple(_value_info(t, types) for t in writes), live=live,
                                opsets=tuple(model.opset_import), ir_version=model.ir_version))
    return segments


@dataclass
class StateCache:
    """Segment states by key, least recently used evicted first once ``max_bytes`` is exceeded."""

    max_bytes: int
    _entries: OrderedDict[str, tuple[list[State], int]] = field(default_factory=OrderedDict)
    bytes: int = 0
    hits: int = 0
    misses: int = 0

    def get(self, key: str) -> list[State] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def touch(self, keys: Iterable[str]) -> None:
        """Mark ``keys`` recently used (the shallower states of a prefix just reused stay with it)."""
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)

    def put(self, key: str, states: list[State]) -> None:
        size = sum(int(a.nbytes) for s in states for a in s.values())
        if key in self._entries or size > self.max_bytes:
            return
        self._entries[key] = (states, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped


@dataclass(frozen=True, kw_only=True)
class ChainRun:
    """What one candidate's run did: its outputs per batch and how many segments ran."""

    outputs: list[State]
    segments_run: int
    segments_total: int


def run_chain(segments: Sequence[Segment], feeds: Sequence[Mapping[str, npt.NDArray[Any]]], cache: StateCache,
              threads: int = 0) -> ChainRun:
    """Run ``segments`` over every feed batch, starting after the longest prefix whose state is cached."""
    from builder.evaluate.runner import OrtRunner

    start, states = 0, [dict[str, npt.NDArray[Any]]() for _ in feeds]
    for seg in range(len(segments) - 1, -1, -1):
        cached = cache.get(segments[seg].key)
        if cached is not None:
            start, states = seg + 1, [dict(s) for s in cached]
            cache.touch(s.key for s in segments[:seg])
            cache.touch([segments[seg].key])
            cache.hits += 1
            break
    else:
        cache.misses += 1
    for segment in segments[start:]:
        runner = OrtRunner(segment.model(), threads=threads)
        reads, writes = segment.read_names, segment.write_names
        for feed, state in zip(feeds, states, strict=True):
            inputs = {t: state[t] if t in state else feed[t] for t in reads}
            # own copies: ONNX Runtime's arrays can keep the session's memory arena alive while cached
            state.update((t, np.array(v, copy=True)) for t, v in zip(writes, runner.run(inputs, writes), strict=True))
            for dead in [t for t in state if t not in segment.live]:
                del state[dead]
        cache.put(segment.key, [dict(s) for s in states])
    return ChainRun(outputs=states, segments_run=len(segments) - start, segments_total=len(segments))
