"""Quantizer (planning and lowering stages): SmoothQuant-style migration of activation outliers into the weights.

SmoothQuant (Xiao et al. 2022, arXiv 2211.10438, section 4): for GEMMs Y = X.W with input channels j, a
per-channel smoothing factor

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)        W_j the j-th input row of every consuming weight

moves part of the range of each activation channel into the weights: X.W = (X / s).(diag(s).W). X / s is
quantized per tensor (static, symmetric; one scale TensorRT's INT8 GEMM takes), diag(s).W per output channel
(the weight view ``smooth``, quantized by the WeightSet stage). ``alpha`` is the migration strength: 0 leaves
X as it is, 1 flattens every activation channel to the same range; Llama-family decoders with massive
activations need a high value (0.75-0.85). max|X_j| comes from the per-dimension calibration observer,
max|W_j| from the consumers' float weights (every consumer of one tensor shares one s).

1/s is folded with no runtime op (builder.quant.fold): into the preceding norm's weight for the Q/K/V and
gate/up inputs (RMSNorm: the fused op's scale input or the decomposed form's final Mul by its weight;
LayerNorm: gamma and beta), and into the output channels of the up projection for the down-projection input
(SiLU(gate) * up is linear in up). Any other producer (the attention output feeding o_proj) gets an explicit
Mul by 1/s: the factors could fold into V's output channels (tied across the query heads that share a KV
head), but that also scales the ``present.*.value`` KV-cache outputs, so recipes keep o_proj per tensor.

The per-tensor range of X / s is its maximum, exact from the per-channel maxima: amax = clip * max_j c_j / s_j.
Histogram range methods (percentile, entropy, MSE) would need the distribution of X / s, which calibration
does not observe (it observes X); ``clip`` < 1 clips the largest smoothed channel instead.

Narrower codes of X / s (for decoders, whose unsmoothed inputs do not survive per-tensor quantization):
``sparq`` trims the INT8 codes with SPARQ (Shomron et al. 2021, arXiv 2105.11010, section 3; calib/sparq.py)
between Q and DQ, lowered by builder.quant.sparq.insert_sparq_qdq; ``bits`` < 8 keeps symmetric b-bit codes in
[-L, L], L = 2**(b-1) - 1, scale amax / L, behind a Clip to [-amax, amax] (the plain low-bit baseline of
builder.quant.lowbit on the smoothed input). The vSPARQ zero-pair count of the plan is not reported for a
smoothed input: calibration observes X, not X / s.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np

from builder.quant.base import ActivationQuantizer, EdgeContext, Placement
from builder.quant.fold import fold_divide, restore, scale_rows
from builder.quant.lowbit import MAX_BITS, MIN_BITS, insert_clipped_qdq, levels_of
from calib.errors import CalibrationError, ConfigError
from calib.quant import fake_quantize, scale_from_amax
from calib.schema import Schema
from calib.sparq import SparqConfig, sparq_fake_quant

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.plan.artifact import ActivationEdge
    from builder.quant.base import F32

logger = logging.getLogger(__name__)

VIEW = "smooth"
FLOOR = 1e-5  # lower bound of max|X_j| and max|W_j| (a dead channel must not give s_j = 0)


class SmoothConfig(Schema, frozen=True, kw_only=True):
    """``alpha``: migration strength in [0, 1]; ``range``: how the per-tensor range of X / s is chosen (``max``:
    the largest smoothed channel); ``clip``: a factor in (0, 1] on that range; ``sparq``: SPARQ on the INT8 codes
    of X / s; ``bits``: 2..8, plain b-bit codes of X / s (not with ``sparq``)."""

    alpha: float = 0.5
    range: Literal["max"] = "max"
    clip: float = 1.0
    sparq: SparqConfig | None = None
    bits: int = MAX_BITS

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha {self.alpha} is outside [0, 1] (SmoothQuant's migration strength; 0.5 for "
                              "most models, 0.75-0.85 for strong activation outliers)")
        if not 0.0 < self.clip <= 1.0:
            raise ConfigError(f"clip {self.clip} is outside (0, 1]")
        check_bits(self.bits, self.sparq)


def check_bits(bits: int, sparq: SparqConfig | None) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"quantizer smooth: bits {bits!r} is not allowed; use an integer in {MIN_BITS}..{MAX_BITS}")
    if sparq is not None and bits != MAX_BITS:
        raise ConfigError(f"quantizer smooth: sparq trims INT8 codes, so bits must stay {MAX_BITS}, not {bits}")


class SmoothParams(Schema, frozen=True, kw_only=True):
    feature_scale: tuple[float, ...]  # s, one per input channel (float32 values)
    amax: float  # per-tensor range of X / s
    sparq: SparqConfig | None = None  # SPARQ on the INT8 codes of X / s
    bits: int = MAX_BITS  # codes in [-L, L], L = 2**(bits-1) - 1, scale amax / L

    def __post_init__(self) -> None:
        if not self.feature_scale or not self.amax > 0.0:
            raise ConfigError("smoothing parameters need feature scales and a positive amax")
        check_bits(self.bits, self.sparq)

    @property
    def scale(self) -> np.float32:
        """The per-tensor scale of the codes of X / s."""
        return np.float32(float(self.amax) / levels_of(self.bits))


def smoothing_scales(channel_amax: np.ndarray, weight_amax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha) in float32 (both maxima floored at 1e-5)."""
    c = np.maximum(np.asarray(channel_amax, dtype=np.float64), FLOOR)
    w = np.maximum(np.asarray(weight_amax, dtype=np.float64), FLOOR)
    return (np.power(c, alpha) / np.power(w, 1.0 - alpha)).astype(np.float32)


def weight_row_amax(edge: EdgeContext) -> np.ndarray:
    """max|W_j| over every consumer's weight and output channel, per input channel j."""
    missing = [c for c in edge.consumers if c not in edge.weights]
    if missing or not edge.consumers:
        raise ConfigError(f"tensor {edge.tensor!r}: smoothing needs the float weights of its consumers "
                          f"({', '.join(missing) or 'none given'}); plan with the model (builder.pipeline.plan_model)")
    rows: np.ndarray | None = None
    for consumer in edge.consumers:
        weight, axis = edge.weights[consumer]()
        if weight.ndim != 2:
            raise ConfigError(f"GEMM {consumer!r}: smoothing needs a 2-D weight, got shape {weight.shape}")
        amax = np.max(np.abs(weight.astype(np.float64)), axis=axis)
        if rows is not None and amax.shape != rows.shape:
            raise ConfigError(f"tensor {edge.tensor!r}: its consumers' weights have {rows.size} and {amax.size} "
                              "input channels")
        rows = amax if rows is None else np.maximum(rows, amax)
    assert rows is not None
    return rows


class SmoothQuantizer(ActivationQuantizer[SmoothConfig, SmoothParams]):
    name = "smooth"
    config_type = SmoothConfig
    params_type = SmoothParams
    placements = frozenset({Placement.WEIGHT_INPUT})
    observers = ("minmax", "dims")
    lowering_pass = "fold"

    def decide(self, edge: EdgeContext, config: SmoothConfig) -> SmoothParams:
        dims = edge.statistics.dims
        channel = None if dims is None else dims.channel_amax
        if channel is None:
            raise CalibrationError(f"tensor {edge.tensor!r}: smoothing needs per-channel statistics, but its last "
                                   "axis is not a feature axis (or it was calibrated without per-dimension ranges)")
        weights = weight_row_amax(edge)
        if weights.size != channel.size:
            raise CalibrationError(f"tensor {edge.tensor!r} has {channel.size} channels, its consumers' weights "
                                   f"{weights.size} input rows")
        s = smoothing_scales(channel, weights, config.alpha)
        amax = config.clip * float(np.max(np.asarray(channel, dtype=np.float64) / s.astype(np.float64)))
        if not amax > 0.0:
            raise CalibrationError(f"tensor {edge.tensor!r} was zero on every calibration token")
        return SmoothParams(feature_scale=tuple(float(v) for v in s), amax=amax, sparq=config.sparq,
                            bits=config.bits)

    def describe(self, config: SmoothConfig, params: SmoothParams) -> str:
        from builder.quant.sparq import sparq_label

        clip = "" if config.clip == 1.0 else f",clip={config.clip}"
        narrow = (f"+{sparq_label(params.sparq)}" if params.sparq is not None
                  else "" if params.bits == MAX_BITS else f"@{params.bits}b")
        return f"smooth:alpha={config.alpha},{config.range}{clip}{narrow}"

    def weight_views(self, params: SmoothParams, weight: F32, axis: int) -> dict[str, F32]:
        return {VIEW: scale_rows(weight, axis, np.asarray(params.feature_scale, dtype=np.float32))}

    def lower(self, ctx: LoweringContext, edge: ActivationEdge) -> None:
        ed, params = ctx.ed, edge.params
        scale = np.asarray(params.feature_scale, dtype=np.float32)
        readers = {n.name for n in ed.consumers(edge.tensor)}
        was_output = ed.is_graph_output(edge.tensor)
        others = readers - set(edge.consumers)
        folded = fold_divide(ctx, edge.tensor, scale, VIEW, in_place=not others and not was_output)
        if folded.kind == "mul":
            logger.info("tensor %s: 1/s cannot be folded into its producer; an explicit Mul divides it", edge.tensor)
        for name in edge.consumers:
            ed.replace_input(ed.node(name), edge.tensor, folded.source)
        _insert_codes(ctx, edge, folded.source, params)
        if folded.detached and (others or was_output):
            restore(ed, folded.source, scale, edge.tensor, VIEW)  # the other readers get X back: (X / s) * s

    def reference(self, x: F32, params: SmoothParams) -> F32:
        """What the folded GEMM effectively reads: DQ(Q(x / s)) * s (s moved into the weight rows)."""
        s = np.asarray(params.feature_scale, dtype=np.float32)
        xs = np.asarray(x, dtype=np.float32) / s
        if params.sparq is not None:
            return (sparq_fake_quant(xs, float(scale_from_amax(params.amax)), params.sparq) * s).astype(np.float32)
        if params.bits != MAX_BITS:
            bound = np.float32(params.amax)
            return (fake_quantize(np.clip(xs, -bound, bound), params.scale) * s).astype(np.float32)
        return (fake_quantize(xs, scale_from_amax(params.amax)) * s).astype(np.float32)


def _insert_codes(ctx: LoweringContext, edge: ActivationEdge, source: str, params: SmoothParams) -> None:
    """Q -> DQ on the smoothed ``source`` for the edge's consumers: INT8, SPARQ-trimmed INT8, or b-bit codes."""
    from builder.quant.sparq import SparqParams, insert_sparq_qdq, reduction_size

    if params.sparq is not None:
        sparq = SparqParams(amax=params.amax, sparq=params.sparq, pairs=0, zero_pairs_low=0, zero_pairs_high=0)
        insert_sparq_qdq(ctx, source, sparq, edge.consumers, reduction_size(ctx, edge))
        return
    if params.bits == MAX_BITS:
        ctx.insert_qdq(source, params.amax, edge.consumers)
        return
    insert_clipped_qdq(ctx, source, params.amax, float(params.scale), edge.consumers)
