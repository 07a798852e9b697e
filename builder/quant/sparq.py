"""Quantizer (planning and lowering stages): SPARQ, sparsity-aware activation quantization (bSPARQ and vSPARQ).

Shomron, Gabbay, Kurzum, Weiser, "Post-Training Sparsity-Aware Quantization", NeurIPS 2021, arXiv 2105.11010,
section 3: every INT8 activation code keeps only an n-bit window that starts at its leading one (bSPARQ), and
with vSPARQ a code whose pair partner along the reduction axis is zero keeps 2n bits. The numerics, the sign
handling and the window tables are ``calib/sparq.py``'s; this module makes SPARQ a registered activation
quantizer for the inputs of weight GEMMs:

    x -> QuantizeLinear(s) -> [SPARQ composition: INT8 codes -> trimmed INT8 codes] -> DequantizeLinear(s) -> GEMM
                                 (builder/lower/sparq_ops.py; standard ops, TensorRT-RTX builds it)

    s = float32(amax / 127), amax from the configured range method (max, percentile, entropy or mse) applied
    to the tensor's Statistics, as for a static per-tensor INT8 edge

The trimmed codes are still INT8, so the GEMM stays an ordinary INT8 GEMM and the engine reproduces SPARQ's
accuracy effect exactly; its speed-up needs multipliers built for the n-bit window (section 4 of the paper).
The plugin variant replaces Q + composition by one ``SparqQuantize`` node (plugins/sparq_quant/README.md).

The plan reports, per SPARQ tensor, how many of its pairs hold a zero code at the decided scale (where vSPARQ
gives the partner 2n bits), measured on the calibration data by the ``sparq_pairs`` observer
(calib/sparq_observer.py): exact lower and upper bounds ``zero_pairs_low <= count <= zero_pairs_high`` out of
``pairs`` (padding tokens excluded; the bounds differ by the pairs whose smaller |x| lies within 0.4% of the
zero threshold s/2). The count is reported for bSPARQ edges as well: it is what vSPARQ would exploit there.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import numpy as np
from onnx import numpy_helper

from builder.quant.base import ActivationQuantizer, EdgeContext, Placement
from builder.quant.static import check_range, decided_amax, range_spec
from calib.errors import BuildError, ConfigError, InternalError, suggest
from calib.quant import scale_from_amax
from calib.schema import Schema
from calib.sparq import Rounding, SparqConfig, sparq_fake_quant

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.plan.artifact import ActivationEdge
    from builder.quant.base import F32

logger = logging.getLogger(__name__)

SparqRange = Literal["max", "percentile", "entropy", "mse"]


class SparqQuantConfig(Schema, frozen=True, kw_only=True):
    """SPARQ options (``calib.sparq.SparqConfig``) plus the range of the underlying per-tensor INT8 scale.

    ``window_bits`` n in 2..7; ``placements`` the window positions (n=4: 5, 3 or 2; default every position);
    ``rounding`` ``nearest_even`` or ``truncate``; ``vsparq`` pairs along the GEMM's reduction axis;
    ``range`` how amax is chosen (``percentile`` with ``percentile``).
    """

    window_bits: int = 4
    placements: int | None = None
    rounding: str = Rounding.NEAREST_EVEN.value
    vsparq: bool = False
    range: SparqRange = "max"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.range not in ("max", "percentile", "entropy", "mse"):  # a Python caller passing range: fixed
            raise ConfigError(f"quantizer sparq takes range max, percentile, entropy or mse, not {self.range!r}")
        check_range(self.range, self.percentile)
        self.sparq()  # ConfigError for a window, placement count or rounding SPARQ does not have

    def sparq(self) -> SparqConfig:
        """The ``calib.sparq`` options with the placement count made explicit."""
        known = [r.value for r in Rounding]
        if self.rounding not in known:
            raise ConfigError(f"SPARQ rounding {self.rounding!r} is not known; use {' or '.join(known)}"
                              + suggest(str(self.rounding), known))
        config = SparqConfig(window_bits=self.window_bits, placements=self.placements,
                             rounding=Rounding(self.rounding), vsparq=self.vsparq)
        return SparqConfig(window_bits=config.window_bits, placements=config.positions, rounding=config.rounding,
                           vsparq=config.vsparq)


class SparqParams(Schema, frozen=True, kw_only=True):
    """What the plan records for one SPARQ edge (the lowering needs nothing else)."""

    amax: float  # symmetric range of the INT8 codes: scale = amax / 127
    sparq: SparqConfig
    pairs: int  # vSPARQ pairs seen in calibration (along the last axis; padding excluded)
    zero_pairs_low: int  # pairs holding a zero code at this scale: exact bounds
    zero_pairs_high: int

    def __post_init__(self) -> None:
        if not self.amax > 0.0:
            raise ConfigError(f"amax {self.amax} must be positive")
        if not 0 <= self.zero_pairs_low <= self.zero_pairs_high <= self.pairs:
            raise ConfigError(f"SPARQ zero-pair bounds {self.zero_pairs_low}..{self.zero_pairs_high} do not lie in "
                              f"0..{self.pairs} pairs")

    @property
    def zero_pair_share(self) -> float:
        """Share of pairs in which vSPARQ finds a zero (middle of the bounds; 0.0 without pairs)."""
        return (self.zero_pairs_low + self.zero_pairs_high) / 2 / self.pairs if self.pairs else 0.0


def sparq_label(config: SparqConfig) -> str:
    """``vsparq4:5opt`` / ``bsparq4:3opt:trunc``."""
    kind = "vsparq" if config.vsparq else "bsparq"
    trunc = ":trunc" if config.rounding is Rounding.TRUNCATE else ""
    return f"{kind}{config.window_bits}:{config.positions}opt{trunc}"


class SparqQuantizer(ActivationQuantizer[SparqQuantConfig, SparqParams]):
    name = "sparq"
    config_type = SparqQuantConfig
    params_type = SparqParams
    placements = frozenset({Placement.WEIGHT_INPUT})  # the weight fixes the reduction axis vSPARQ pairs along
    observers = ("minmax", "histogram", "sparq_pairs")

    def decide(self, edge: EdgeContext, config: SparqQuantConfig) -> SparqParams:
        amax, _ = decided_amax(edge, config.range, config.percentile)
        bounds = edge.statistics.get("sparq_pairs").zero_pairs(scale_from_amax(amax))
        params = SparqParams(amax=amax, sparq=config.sparq(), pairs=bounds.pairs, zero_pairs_low=bounds.low,
                             zero_pairs_high=bounds.high)
        logger.info("SPARQ %s: a zero code in %.2f%% of %d pairs (%d..%d) at amax %.6g", edge.tensor,
                    100 * params.zero_pair_share, bounds.pairs, bounds.low, bounds.high, amax)
        return params

    def describe(self, config: SparqQuantConfig, params: SparqParams) -> str:
        return f"{range_spec(config.range, config.percentile).label}+{sparq_label(params.sparq)}"

    def lower(self, ctx: LoweringContext, edge: ActivationEdge) -> None:
        params: SparqParams = edge.params
        k = reduction_size(ctx, edge)
        insert_sparq_qdq(ctx, edge.tensor, params, edge.consumers, k)

    def reference(self, x: F32, params: SparqParams) -> F32:
        return sparq_fake_quant(x, float(scale_from_amax(params.amax)), params.sparq)


def reduction_size(ctx: LoweringContext, edge: ActivationEdge) -> int:
    """K, the reduction length of the GEMMs reading ``edge`` (from their planned weights; they must agree)."""
    sizes = set()
    for node in edge.consumers:
        planned = ctx.weight_edge(node)
        weight = None if planned is None else ctx.ed.initializer(planned.weight)
        if planned is None or weight is None or weight.ndim != 2:
            raise BuildError(f"SPARQ input {edge.tensor!r}: consumer {node!r} has no planned 2-D weight to take the "
                             "reduction axis from")
        sizes.add(int(weight.shape[1 - planned.axis]))
    if len(sizes) != 1:
        raise BuildError(f"SPARQ input {edge.tensor!r}: its GEMMs reduce over different lengths {sorted(sizes)}")
    return sizes.pop()


def _claim(ctx: LoweringContext, name: str) -> str:
    """Register ``name`` with the editor; a name already in the graph is a bug (the prefix is unique)."""
    if ctx.ed.unique(name) != name:
        raise InternalError(f"SPARQ lowering: {name!r} is already used in the graph")
    return name


def insert_sparq_qdq(ctx: LoweringContext, tensor: str, params: SparqParams, consumers: tuple[str, ...],
                     k: int) -> str:
    """Q -> SPARQ composition -> DQ on ``tensor`` for the named ``consumers``; returns the DQ output."""
    from builder.lower.sparq_ops import sparq_nodes

    ed = ctx.ed
    scale = ed.add_initializer(f"{tensor}_scale", np.array(scale_from_amax(params.amax), dtype=np.float32))
    zero = ed.add_initializer(f"{tensor}_zero_point", np.array(0, dtype=np.int8))
    quantized = ed.unique(f"{tensor}_quantized")
    trimmed = ed.unique(f"{tensor}_sparq_codes")
    dequantized = ed.unique(f"{tensor}_dequantized")
    ed.add_node("QuantizeLinear", [tensor, scale, zero], [quantized], name=f"{tensor}_QuantizeLinear")
    span = sparq_nodes(quantized, trimmed, ed.unique(f"{tensor}_sparq"), params.sparq, reduction_size=k)
    for init in span.initializers:
        if ed.add_initializer(init.name, numpy_helper.to_array(init)) != init.name:
            raise InternalError(f"SPARQ lowering: constant {init.name!r} was renamed")
    for node in span.nodes:
        for out in node.output:
            if out != trimmed:
                _claim(ctx, out)
        added = ed.add_node(node.op_type, node.input, node.output, name=node.name)
        if added.name != node.name:
            raise InternalError(f"SPARQ lowering: node name {node.name!r} is already used in the graph")
        added.CopyFrom(node)
    ed.add_node("DequantizeLinear", [trimmed, scale, zero], [dequantized], name=f"{tensor}_DequantizeLinear")
    ed.redirect(consumers, tensor, dequantized)
    return dequantized
