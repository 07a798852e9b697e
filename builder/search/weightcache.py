"""Precision search (evaluation side): quantized weights kept across candidates, so each is quantized once.

Every candidate of one search is planned from the same model and Statistics, and most of its GEMM weights are
quantized exactly as in the candidate before (a fallback changes a few GEMMs, or the smoothing scales of the
inputs they share). Data-aware quantizers make that costly to repeat: OPTQ (Frantar et al. 2022, arXiv
2210.17323) solves one Hessian system per GEMM. The cache keys a GEMM's WeightSet entries by everything
builder.weights.stage reads to make them, apart from the model and Statistics the cache is bound to:

* the GEMM's weight-plan entry (node, weight initializer, input tensor, axis, weight quantizer and its config,
  bias-correction flag), and
* its input edge's quantizer and parameters (or none): they choose the float views (SmoothQuant and HERO FWQ
  rescale the weight, PEG splits it) and map the input Hessian to them.

A candidate quantizes only the GEMMs whose key is new, through the stage itself (a plan holding just those
GEMMs), so a cached entry is the stage's own result for the same inputs. Plans whose weights depend on one
another -- weight quantizers that read the quantized model's inputs (GPFQ) or empirical bias correction -- are
not cached (:func:`cacheable`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import msgspec
import onnx

from builder.plan.artifact import ActivationEdge, QuantPlan, WeightEdge
from builder.quant.base import QuantizedWeight
from builder.quant.registry import weight_quantizer
from builder.quant.weight_common import CalibWeightQuantizer
from builder.weights.weightset import WeightSet
from calib.schema import to_json
from calib.statistics import Statistics

logger = logging.getLogger(__name__)

Entries = dict[str, QuantizedWeight]  # WeightSet key (node or node#view) -> integer weight


def cacheable(plan: QuantPlan) -> bool:
    """Whether every GEMM's weights depend only on its own key: no bias correction, no quantizer reading the
    quantized model's inputs."""
    if plan.bias_correction_nodes:
        return False
    return not any(isinstance(q, CalibWeightQuantizer) and q.quantized_inputs
                   for q in (weight_quantizer(w.quantizer) for w in plan.weights))


def weight_key(weight: WeightEdge, edge: ActivationEdge | None) -> str:
    """SHA-256 of the weight-plan entry and its input edge's quantizer and parameters (see the module docstring)."""
    h = hashlib.sha256(to_json(weight).encode())
    h.update(b"|no-edge" if edge is None else f"|{edge.quantizer}|".encode() + to_json(edge.params).encode())
    return h.hexdigest()


def _size(entries: Entries) -> int:
    return sum(w.values.nbytes + w.scales.nbytes for w in entries.values())


@dataclass
class WeightCache:
    """Quantized weights of one model and one Statistics across candidates, least recently used evicted past
    ``max_bytes`` (0: nothing kept)."""

    model: onnx.ModelProto
    statistics: Statistics | None
    max_bytes: int = 1 << 30
    hits: int = 0
    misses: int = 0
    bytes: int = 0
    _entries: OrderedDict[str, Entries] = field(default_factory=OrderedDict)

    def weights(self, plan: QuantPlan) -> WeightSet:
        """The WeightSet of ``plan`` (which must be :func:`cacheable`), quantizing only GEMMs not cached."""
        from builder.weights.stage import quantize_weights

        assert cacheable(plan), "plans with bias correction or staged weights are not cached"
        edges = {a.tensor: a for a in plan.activations}
        keys = [weight_key(w, edges.get(w.input)) for w in plan.weights]
        new = [w for w, k in zip(plan.weights, keys, strict=True) if k not in self._entries]
        fresh: dict[str, Entries] = {}
        if new:
            made = quantize_weights(self.model, msgspec.structs.replace(plan, weights=tuple(new)), self.statistics)
            for w in new:
                fresh[w.node] = {k: v for k, v in made.entries.items() if k == w.node or k.startswith(f"{w.node}#")}
            assert sum(map(len, fresh.values())) == len(made.entries), "a WeightSet key matched two GEMMs"
        self.misses += len(new)
        self.hits += len(keys) - len(new)
        entries: Entries = {}
        for w, key in zip(plan.weights, keys, strict=True):
            got = fresh.get(w.node) if key not in self._entries else self._entries[key]
            assert got is not None
            entries.update(got)
            self._keep(key, got)
        return WeightSet(entries=entries)

    def _keep(self, key: str, entries: Entries) -> None:
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        size = _size(entries)
        if size > self.max_bytes:
            return
        self._entries[key] = entries
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= _size(dropped)
