"""Quantizer (planning and lowering stages): ZeroQuant-HERO feature-wise scales (FWQ), folded away.

ZeroQuant-HERO (Yao et al. 2023, arXiv 2310.17723, section 3): an activation X with per-feature scales S
feeding GEMMs X.W is quantized as X / S per tensor, and S is folded out of the runtime graph:

    LN(x) / S = x_hat * (gamma / S) + beta / S          fold into the LayerNorm's gamma and beta
    X . W     = (X / S) . (diag(S) . W)                  fold S into the rows of every consuming weight

so X / S gets a native per-tensor Q/DQ and W' = diag(S).W is quantized per output channel (the WeightSet
stage quantizes the folded view). 1/S is folded into the producer by builder.quant.fold (LayerNorm gamma and
beta, RMSNorm weight, decomposed norms, the up projection's output channels of a gated MLP; else an explicit
Mul by 1/S). When the norm output also feeds the residual stream:

  * consumers = the GEMMs only: the norm is duplicated; the original keeps feeding the residual (a norm read
    by the GEMMs alone, as in a pre-norm decoder, is folded itself);
  * consumers = every reader ("*", LN output in INT8): the norm itself is folded, and the non-GEMM
    readers get the dequantized value multiplied back by S.

S_j = c_j ** alpha (c_j the per-feature max|x|), normalized so the largest feature keeps its scale: alpha = 1
makes every folded feature span the same range; smaller alpha migrates less of the range into the weights (the
knob follows SmoothQuant's migration strength, Xiao et al. 2022, arXiv 2211.10438; builder.quant.smooth is
SmoothQuant's own choice of S, which also looks at the weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from builder.quant.base import ActivationQuantizer, EdgeContext, Placement
from builder.quant.fold import fold_divide, restore, scale_rows
from calib.errors import CalibrationError, ConfigError
from calib.quant import fake_quantize, scale_from_amax
from calib.schema import Schema

if TYPE_CHECKING:
    from collections.abc import Sequence

    from builder.lower.context import LoweringContext
    from builder.plan.artifact import ActivationEdge
    from builder.quant.base import F32

VIEW = "fwq"


class FwqConfig(Schema, frozen=True, kw_only=True):
    alpha: float = 1.0  # migration strength: S_j = c_j ** alpha

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha {self.alpha} is outside [0, 1]")


class FwqParams(Schema, frozen=True, kw_only=True):
    feature_scale: tuple[float, ...]  # S, one per feature (float32 values)
    amax: float  # per-tensor range of X / S

    def __post_init__(self) -> None:
        if not self.feature_scale or not self.amax > 0.0:
            raise ConfigError("FWQ parameters need feature scales and a positive amax")


def feature_scales(channel_amax: Sequence[float], alpha: float) -> tuple[tuple[float, ...], float]:
    """S_j = c_j ** alpha (normalized to max 1) and the per-tensor amax of X / S."""
    c = np.asarray(channel_amax, dtype=np.float64)
    floor = max(float(c.max()) * 1e-4, 1e-8)
    c = np.maximum(c, floor)
    s = np.power(c, alpha)
    s = s / float(np.max(s)) if alpha > 0 else s  # normalize: the largest feature keeps its scale
    amax = float(np.max(c / s))
    return tuple(float(v) for v in s.astype(np.float32)), amax


class FwqQuantizer(ActivationQuantizer[FwqConfig, FwqParams]):
    name = "fwq"
    config_type = FwqConfig
    params_type = FwqParams
    placements = frozenset({Placement.WEIGHT_INPUT, Placement.OUTPUT})
    observers = ("minmax", "dims")
    lowering_pass = "fold"

    def decide(self, edge: EdgeContext, config: FwqConfig) -> FwqParams:
        dims = edge.statistics.dims
        channel = None if dims is None else dims.channel_amax
        if channel is None:
            raise CalibrationError(f"tensor {edge.tensor!r}: FWQ needs per-feature statistics, but its last axis "
                                   "is not a feature axis (or it was calibrated without per-dimension ranges)")
        scale, amax = feature_scales(tuple(float(v) for v in channel), config.alpha)
        return FwqParams(feature_scale=scale, amax=amax)

    def describe(self, config: FwqConfig, params: FwqParams) -> str:
        return f"feature-max:alpha={config.alpha}"

    def weight_views(self, params: FwqParams, weight: F32, axis: int) -> dict[str, F32]:
        scale = np.asarray(params.feature_scale, dtype=np.float32)
        return {VIEW: scale_rows(weight, axis, scale)}

    def lower(self, ctx: LoweringContext, edge: ActivationEdge) -> None:
        ed, params = ctx.ed, edge.params
        scale = np.asarray(params.feature_scale, dtype=np.float32)
        readers = list(ed.consumers(edge.tensor))
        gemms = [n for n in readers if (edge.all_consumers and ctx.weight_edge(n.name) is not None
                                        and _weight_index(ctx, n) is not None) or n.name in edge.consumers]
        was_output = ed.is_graph_output(edge.tensor)
        alone = not was_output and len(gemms) == len(readers)  # the GEMMs read it alone: fold the producer itself
        source, detached, _ = fold_divide(ctx, edge.tensor, scale, VIEW, in_place=edge.all_consumers or alone,
                                          rename_mul=edge.all_consumers)
        for node in gemms:
            ed.replace_input(node, edge.tensor, source)
        dq = ctx.insert_qdq(source, params.amax, tuple(n.name for n in gemms))
        if detached and (was_output or len(gemms) < len(readers)):
            # readers that are not INT8 GEMMs get X back: the INT8 value (output edge) or X / S, times S
            restore(ed, dq if edge.all_consumers else source, scale, edge.tensor, VIEW)

    def reference(self, x: F32, params: FwqParams) -> F32:
        """What the folded GEMM effectively reads: DQ(Q(x / S)) * S (S moved into the weight rows)."""
        s = np.asarray(params.feature_scale, dtype=np.float32)
        return (fake_quantize(x / s, scale_from_amax(params.amax)) * s).astype(np.float32)


def _weight_index(ctx: LoweringContext, node: onnx.NodeProto) -> int | None:
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    return 1 if ctx.ed.initializer(node.input[1]) is not None else None
