"""Planning stage: the QuantPlan artifact (per edge what is quantized, how, with which range; per node why).

Lowering inserts exactly what the plan records and nothing else ("decide, then insert once").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from builder.recipes.model import Precision, Scheme
from calib.artifact_io import canonical_json, versioned_object
from calib.errors import ConfigError

PLAN_VERSION = 1
ALL_CONSUMERS = "*"


@dataclass(frozen=True, kw_only=True)
class PegGroup:
    """One per-embedding group: the feature indices (ascending) and their shared symmetric range."""

    dims: tuple[int, ...]
    amax: float

    def to_dict(self) -> dict[str, Any]:
        return {"dims": list(self.dims), "amax": self.amax}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PegGroup:
        return cls(dims=tuple(int(d) for d in data["dims"]), amax=float(data["amax"]))


@dataclass(frozen=True, kw_only=True)
class ActivationQuant:
    """One quantized activation edge.

    ``consumers`` are the nodes that read the quantized value; ``("*",)`` means every consumer, graph
    outputs included (the producer's output itself is quantized). ``amax`` is the per-tensor range of the
    value that enters QuantizeLinear: for ``feature`` it is the range after dividing by ``feature_scale``;
    for ``peg`` each group has its own range and ``amax`` is their maximum. A centered edge (``offset`` not 0)
    quantizes ``x - offset`` with range ``amax`` and its consumers' biases absorb ``offset``.
    """

    tensor: str
    consumers: tuple[str, ...]
    scheme: Scheme
    amax: float
    method: str  # "max", "percentile:99.99", "entropy", "mse", "fixed", "table:<method>"
    feature_scale: tuple[float, ...] | None = None
    groups: tuple[PegGroup, ...] = ()
    scale_group: str = ""  # activations sharing one scale (e.g. the Q/K/V operands of one attention)
    offset: float = 0.0  # centered edges: the midpoint c subtracted before QuantizeLinear

    def __post_init__(self) -> None:
        if not self.amax > 0.0:
            raise ConfigError(f"activation {self.tensor!r}: amax {self.amax} must be positive")
        if self.offset and (self.scheme != Scheme.TENSOR or self.all_consumers):
            raise ConfigError(f"activation {self.tensor!r}: an offset needs scheme tensor and named GEMM consumers")
        if self.scheme == Scheme.FEATURE and not self.feature_scale:
            raise ConfigError(f"activation {self.tensor!r}: scheme feature needs feature scales")
        if self.scheme == Scheme.PEG and not self.groups:
            raise ConfigError(f"activation {self.tensor!r}: scheme peg needs groups")

    @property
    def all_consumers(self) -> bool:
        return self.consumers == (ALL_CONSUMERS,)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "consumers": list(self.consumers),
            "scheme": self.scheme.value,
            "amax": self.amax,
            "method": self.method,
            "feature_scale": None if self.feature_scale is None else list(self.feature_scale),
            "groups": [g.to_dict() for g in self.groups],
            "scale_group": self.scale_group,
            "offset": self.offset,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActivationQuant:
        fs = data.get("feature_scale")
        return cls(tensor=str(data["tensor"]), consumers=tuple(data["consumers"]), scheme=Scheme(data["scheme"]),
                   amax=float(data["amax"]), method=str(data["method"]),
                   feature_scale=None if fs is None else tuple(float(v) for v in fs),
                   groups=tuple(PegGroup.from_dict(g) for g in data.get("groups", [])),
                   scale_group=str(data.get("scale_group", "")), offset=float(data.get("offset", 0.0)))


@dataclass(frozen=True, kw_only=True)
class WeightQuant:
    """A weight initializer stored as INT8 with one symmetric scale per output channel (``axis``).

    ``bias_correction``: after lowering, the GEMM's bias absorbs the mean output error measured on the
    calibration data (:mod:`builder.lower.bias_correction`); serialized only when set.
    """

    node: str
    weight: str
    axis: int
    bits: int = 8
    bias_correction: bool = False

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"node": self.node, "weight": self.weight, "axis": self.axis, "bits": self.bits}
        if self.bias_correction:
            data["bias_correction"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightQuant:
        return cls(node=str(data["node"]), weight=str(data["weight"]), axis=int(data["axis"]),
                   bits=int(data["bits"]), bias_correction=bool(data.get("bias_correction", False)))


@dataclass(frozen=True, kw_only=True)
class NodePlan:
    """The decision for one node with a role: its precision and the reason for it."""

    node: str
    role: str
    layer: int | None
    precision: Precision
    reason: str
    gemm_flops: float = 0.0  # multiply-adds x 2 per sequence at the planning sequence length; 0 for non-GEMMs

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "role": self.role, "layer": self.layer, "precision": self.precision.value,
                "reason": self.reason, "gemm_flops": self.gemm_flops}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodePlan:
        return cls(node=str(data["node"]), role=str(data["role"]),
                   layer=None if data["layer"] is None else int(data["layer"]),
                   precision=Precision(data["precision"]), reason=str(data["reason"]),
                   gemm_flops=float(data.get("gemm_flops", 0.0)))


@dataclass(frozen=True, kw_only=True)
class QuantPlan:
    """Everything lowering needs: quantized edges, INT8 weights, per-node precision with reasons."""

    model_name: str
    recipe_name: str
    recipe_sha256: str
    ranges_sha256: str
    model_dtype: Precision  # fp16: the whole graph is converted (FP16 baseline); fp32: left as exported
    activations: tuple[ActivationQuant, ...]
    weights: tuple[WeightQuant, ...]
    nodes: tuple[NodePlan, ...]
    flagged_layers: tuple[int, ...] = ()
    seq_len: int = 128
    version: int = field(default=PLAN_VERSION)

    @property
    def int8_gemm_flop_share(self) -> float:
        """Share of GEMM FLOPs (weight GEMMs and attention batched MatMuls) that runs in INT8."""
        total = sum(n.gemm_flops for n in self.nodes)
        int8 = sum(n.gemm_flops for n in self.nodes if n.precision == Precision.INT8)
        return 0.0 if total == 0.0 else int8 / total

    @property
    def bias_correction_nodes(self) -> tuple[str, ...]:
        """The INT8 weight GEMMs whose biases get the empirical correction (they need calibration feeds)."""
        return tuple(w.node for w in self.weights if w.bias_correction)

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.node == name:
                return n
        raise KeyError(name)

    def precision_list(self) -> dict[str, str]:
        """Per-node precision for weakly typed TensorRT 10 builds (layer.precision constraints)."""
        return {n.node: n.precision.value for n in self.nodes if n.precision != Precision.FP32}

    def to_json(self) -> str:
        data = {
            "version": self.version,
            "model_name": self.model_name,
            "recipe_name": self.recipe_name,
            "recipe_sha256": self.recipe_sha256,
            "ranges_sha256": self.ranges_sha256,
            "model_dtype": self.model_dtype.value,
            "flagged_layers": list(self.flagged_layers),
            "seq_len": self.seq_len,
            "int8_gemm_flop_share": round(self.int8_gemm_flop_share, 6),
            "activations": [a.to_dict() for a in self.activations],
            "weights": [w.to_dict() for w in self.weights],
            "nodes": [n.to_dict() for n in self.nodes],
        }
        return canonical_json(data)

    @classmethod
    def from_json(cls, text: str) -> QuantPlan:
        data = versioned_object(text, "QuantPlan", PLAN_VERSION)
        return cls(model_name=str(data["model_name"]), recipe_name=str(data["recipe_name"]),
                   recipe_sha256=str(data["recipe_sha256"]), ranges_sha256=str(data["ranges_sha256"]),
                   model_dtype=Precision(data["model_dtype"]),
                   activations=tuple(ActivationQuant.from_dict(a) for a in data["activations"]),
                   weights=tuple(WeightQuant.from_dict(w) for w in data["weights"]),
                   nodes=tuple(NodePlan.from_dict(n) for n in data["nodes"]),
                   flagged_layers=tuple(int(i) for i in data["flagged_layers"]), seq_len=int(data["seq_len"]))
