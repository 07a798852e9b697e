"""Planning stage: the QuantPlan artifact (per edge which quantizer and its decided parameters; per node why).

Lowering inserts exactly what the plan records and nothing else ("decide, then insert once"). Every
activation edge names its registered quantizer (builder.quant.registry) and carries that quantizer's typed
parameters; every INT8 weight names its weight quantizer and config. :func:`load_plan` reads a plan back,
typing each edge's parameters through the registry, so an unknown or misspelled key anywhere is an error.
"""

from __future__ import annotations

from typing import Any

from builder.quant.base import Placement
from builder.recipes.model import Precision
from calib.schema import Schema, convert, decode_json, to_json

PLAN_VERSION = 2
ALL_CONSUMERS = "*"


class ActivationEdge(Schema, frozen=True, kw_only=True):
    """One quantized activation.

    ``consumers`` are the nodes that read the quantized value; ``("*",)`` means every reader, graph outputs
    included (the producer's output itself is quantized). ``params`` is the registered quantizer's parameter
    Struct; ``scale_group`` names activations that share one scale (the Q, K and V operands of one attention).
    """

    tensor: str
    consumers: tuple[str, ...]
    placement: Placement
    quantizer: str
    params: Any
    method: str  # how the range was chosen, e.g. "max", "mse+center", "feature-max:alpha=1"
    scale_group: str = ""

    @property
    def all_consumers(self) -> bool:
        return self.consumers == (ALL_CONSUMERS,)


class WeightEdge(Schema, frozen=True, kw_only=True):
    """A GEMM weight stored as integers with scales (the WeightSet stage computes them).

    ``axis`` is the output-channel axis of the stored weight (MatMul W[K, N]: 1; Gemm transB=1: 0; an
    embedding [V, H] that a tied LM head reads through a Transpose: 0). ``path`` names the layout nodes between
    the initializer and the GEMM (that Transpose); the integer weight is dequantized in the initializer's layout
    and the path reads it. ``bias_correction``: the GEMM's bias absorbs the mean output error measured on the
    calibration data.
    """

    node: str
    weight: str  # the float weight initializer
    input: str  # the activation tensor the GEMM multiplies with it
    axis: int
    quantizer: str
    config: Any
    path: tuple[str, ...] = ()
    bias_correction: bool = False


class NodePlan(Schema, frozen=True, kw_only=True):
    """The decision for one node with a role: its precision and the reason for it."""

    node: str
    role: str
    layer: int | None
    precision: Precision
    reason: str
    gemm_flops: float = 0.0  # multiply-adds x 2 per sequence at the planning sequence length; 0 for non-GEMMs


class QuantPlan(Schema, frozen=True, kw_only=True):
    """Everything the weight and lowering stages need: quantized edges, weights, per-node precision and why."""

    version: int = PLAN_VERSION
    model_name: str
    recipe_name: str
    recipe_sha256: str
    statistics_digest: str  # model hash and data digest of the Statistics the ranges came from
    model_dtype: Precision  # fp16: the whole graph is converted (FP16 baseline); fp32: left as exported
    flagged_layers: tuple[int, ...] = ()
    seq_len: int = 128
    activations: tuple[ActivationEdge, ...]
    weights: tuple[WeightEdge, ...]
    nodes: tuple[NodePlan, ...]

    @property
    def weight_only_nodes(self) -> frozenset[str]:
        """INT8-planned GEMMs whose activation inputs all stay float (quantizer ``none``): integer weights,
        float arithmetic (W4A16 / W8A16)."""
        float_in = {c for a in self.activations if a.quantizer == "none" for c in a.consumers}
        quantized_in = {c for a in self.activations if a.quantizer != "none" for c in a.consumers}
        return frozenset(float_in - quantized_in)

    @property
    def int8_gemm_flop_share(self) -> float:
        """Share of GEMM FLOPs (weight GEMMs and attention batched MatMuls) that runs in INT8 (weight-only GEMMs
        compute in float, so they do not count)."""
        total = sum(n.gemm_flops for n in self.nodes)
        weight_only = self.weight_only_nodes
        int8 = sum(n.gemm_flops for n in self.nodes if n.precision == Precision.INT8 and n.node not in weight_only)
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
        return to_json(self)


def load_plan(text: str | bytes, where: str = "plan.json") -> QuantPlan:
    """A QuantPlan from JSON, every edge's parameters typed by its registered quantizer (strict)."""
    from msgspec.structs import replace

    from builder.quant.registry import activation_quantizer, weight_quantizer

    plan = decode_json(text, QuantPlan, where, version=PLAN_VERSION)
    activations = tuple(
        replace(a, params=convert(a.params, activation_quantizer(a.quantizer).params_type,
                                  f"{where} activations[{i}].params ({a.quantizer})"))
        for i, a in enumerate(plan.activations))
    weights = tuple(
        replace(w, config=convert(w.config, weight_quantizer(w.quantizer).config_type,
                                  f"{where} weights[{i}].config ({w.quantizer})"))
        for i, w in enumerate(plan.weights))
    return replace(plan, activations=activations, weights=weights)
