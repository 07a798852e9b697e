"""Quantizer (planning and lowering stages): plain low-bit per-tensor activations on the INT8 grid (the A4 baseline).

SPARQ's claim (Shomron et al., NeurIPS 2021, arXiv 2105.11010, section 5) is measured against plain 4-bit
activation quantization. TensorRT quantizes activations to INT8 only, but a b-bit symmetric code is an INT8
code in [-L, L], L = 2**(b-1) - 1, so an engine holds it exactly with one clip before the Q/DQ pair:

    x -> Clip(-a, a) -> QuantizeLinear(s) -> DequantizeLinear(s) -> GEMM        s = float32(amax / L), a = float32(amax)

|x| <= a gives |x / s| <= L (a few float32 ulps around L at most, which round to L), so every code lies in
[-L, L]: round half to even, as a b-bit quantizer with zero-point 0. The Clip is a pointwise op a builder
fuses into the producer. The range comes from the Statistics: ``max``, ``percentile`` (both independent of
the bit width) or ``mse``, the clip that minimises the expected squared error of the b-bit grid over the
|x| histogram (:func:`amax_mse_levels`; the INT8 ``mse`` method assumes 127 levels). TensorRT's ``entropy``
is an INT8 (128-level) criterion and is not offered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from builder.quant.base import ActivationQuantizer, EdgeContext, Placement
from builder.quant.static import check_range, decided_amax
from calib import methods
from calib.errors import CalibrationError, ConfigError
from calib.quant import fake_quantize
from calib.schema import Schema

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.plan.artifact import ActivationEdge
    from builder.quant.base import F32
    from builder.recipes.model import Recipe

MIN_BITS = 2
MAX_BITS = 8
LowBitRange = Literal["max", "percentile", "mse"]


def levels_of(bits: int) -> int:
    """L = 2**(bits-1) - 1, the largest code magnitude of a symmetric b-bit quantizer."""
    return (1 << (bits - 1)) - 1


class LowBitConfig(Schema, frozen=True, kw_only=True):
    """``bits`` 2..8 (codes in [-L, L]); ``range`` max, percentile (with ``percentile``) or mse at ``bits``."""

    bits: int = 4
    range: LowBitRange = "mse"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"quantizer lowbit: bits {self.bits!r} is not allowed; use an integer in "
                              f"{MIN_BITS}..{MAX_BITS}")
        if self.range not in ("max", "percentile", "mse"):
            raise ConfigError(f"quantizer lowbit takes range max, percentile or mse, not {self.range!r}")
        check_range(self.range, self.percentile)


class LowBitParams(Schema, frozen=True, kw_only=True):
    amax: float  # the clip: codes are round(clip(x, -amax, amax) / scale), scale = amax / L
    bits: int

    def __post_init__(self) -> None:
        if not self.amax > 0.0:
            raise ConfigError(f"amax {self.amax} must be positive")

    @property
    def scale(self) -> np.float32:
        return np.float32(float(self.amax) / levels_of(self.bits))


def amax_mse_levels(counts: npt.ArrayLike, bin_width: float, levels: int, *, max_candidates: int = 1024) -> float:
    """The bin centre amax minimising sum_j counts_j * (c_j - dq(q(c_j)))^2 over the |x| histogram's bin centres,
    q with scale amax / ``levels``, round half to even, clamp to ``levels`` (calib.methods.amax_mse at 127)."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not c.sum() > 0 or not bin_width > 0:
        raise CalibrationError("the mse range needs a non-empty |x| histogram")
    return methods.amax_mse(c, bin_width, start_bin=0, max_candidates=max_candidates, levels=levels)


class LowBitQuantizer(ActivationQuantizer[LowBitConfig, LowBitParams]):
    name = "lowbit"
    config_type = LowBitConfig
    params_type = LowBitParams
    placements = frozenset({Placement.WEIGHT_INPUT, Placement.OPERAND})
    observers = ("minmax", "histogram")

    def decide(self, edge: EdgeContext, config: LowBitConfig) -> LowBitParams:
        if config.range != "mse":
            amax, _ = decided_amax(edge, config.range, config.percentile)
            return LowBitParams(amax=amax, bits=config.bits)
        hist = edge.statistics.get("histogram").histogram
        amax = amax_mse_levels(hist.counts, hist.bin_width, levels_of(config.bits))
        return LowBitParams(amax=min(amax, edge.statistics.minmax.abs_max), bits=config.bits)

    def describe(self, config: LowBitConfig, params: LowBitParams) -> str:
        label = f"percentile:{config.percentile:g}" if config.range == "percentile" else config.range
        return f"{label}@{params.bits}b"

    def lower(self, ctx: LoweringContext, edge: ActivationEdge) -> None:
        params: LowBitParams = edge.params
        insert_clipped_qdq(ctx, edge.tensor, params.amax, float(params.scale), edge.consumers)

    def reference(self, x: F32, params: LowBitParams) -> F32:
        bound = np.float32(params.amax)
        return fake_quantize(np.clip(np.asarray(x, dtype=np.float32), -bound, bound), params.scale)


def lowbit_counterpart(recipe: Recipe, config: LowBitConfig, name: str) -> Recipe:
    """``recipe`` with every SPARQ activation replaced by the plain low-bit ``config`` (the same GEMM inputs,
    weights and precisions): the baseline SPARQ's accuracy is compared against."""
    from dataclasses import replace

    from builder.quant.sparq import SparqQuantConfig

    rules = tuple(replace(rule, set=replace(rule.set, activation=config))
                  if isinstance(rule.set.activation, SparqQuantConfig) else rule for rule in recipe.rules)
    if rules == recipe.rules:
        raise ConfigError(f"recipe {recipe.name!r} quantizes no activation with sparq; nothing to compare against")
    return replace(recipe, name=name, rules=rules,
                   description=f"{recipe.name} with plain {config.bits}-bit activations ({config.range} range)")


def insert_clipped_qdq(ctx: LoweringContext, tensor: str, amax: float, scale: float,
                       consumers: tuple[str, ...]) -> None:
    """Clip(tensor, -amax, amax) -> QuantizeLinear(scale) -> DequantizeLinear for ``consumers``: b-bit codes held
    in INT8 (the clip keeps them within +-amax / scale levels, which QuantizeLinear's INT8 saturation would not)."""
    ed, bound = ctx.ed, np.float32(amax)
    low = ed.add_initializer(f"{tensor}_clip_min", np.array(-bound, dtype=np.float32))
    high = ed.add_initializer(f"{tensor}_clip_max", np.array(bound, dtype=np.float32))
    clipped = ed.unique(f"{tensor}_clipped")
    ed.add_node("Clip", [tensor, low, high], [clipped], name=f"{tensor}_Clip")
    scale_init = ed.add_initializer(f"{tensor}_scale", np.array(scale, dtype=np.float32))
    zero = ed.add_initializer(f"{tensor}_zero_point", np.array(0, dtype=np.int8))
    quantized, dequantized = ed.unique(f"{tensor}_quantized"), ed.unique(f"{tensor}_dequantized")
    ed.add_node("QuantizeLinear", [clipped, scale_init, zero], [quantized], name=f"{tensor}_QuantizeLinear")
    ed.add_node("DequantizeLinear", [quantized, scale_init, zero], [dequantized], name=f"{tensor}_DequantizeLinear")
    ed.redirect(consumers, tensor, dequantized)
