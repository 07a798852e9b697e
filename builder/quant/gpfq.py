"""Quantizer (weight and lowering stages): GPFQ weights from the quantized model's own inputs, optional AXE.

Greedy path following (Lybrand & Saab 2021, arXiv 2010.15979; Zhang, Zhou & Saab 2023, arXiv 2201.11113):
for every output channel, input t's integer weight is chosen to cancel the running error between the float
GEMM X w (float model's input X) and the quantized GEMM X~ q (the input X~ the *quantized* model feeds this
GEMM, with every earlier GEMM and activation already quantized), so each layer also corrects the error its
inputs carry. Computed from H~ = X~^T X~ and G = X~^T X (calib.weights.gpfq, brevitas' matrix form); with
``accumulator_bits`` the AXE constraint (Colbert et al. 2024, arXiv 2409.17092) bounds every tile.

X~ depends on the quantized weights upstream, so the WeightSet stage quantizes GPFQ GEMMs layer after layer
(builder.weights.staged): GEMMs are grouped by depth; for each group it lowers the model with the earlier
groups final, runs the calibration feeds through it and through the FP32 model, and folds the paired rows into
one GpfqObserver per GEMM input (two K x K sums; no activation is kept). The observer reaches ``quantize`` as
the ``gpfq_pairs`` entry of the GEMM's input statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from builder.quant.base import WeightContext
from builder.quant.weight_common import AxeOptions, CalibWeightQuantizer
from calib.errors import CalibrationError, ConfigError
from calib.weights import GpfqConfig as CalibGpfqConfig
from calib.weights import QuantizedWeight as KnWeight
from calib.weights import gpfq

if TYPE_CHECKING:
    from builder.quant.base import F32

PAIRS_KIND = "gpfq_pairs"


class GpfqConfig(AxeOptions, frozen=True, kw_only=True):
    """GPFQ options: ``bits``, ``block``, ``scale``, ``act_order`` and the AXE options (AxeOptions). Scales are
    fixed from the float weight before the pass."""

    def calib(self) -> CalibGpfqConfig:
        return CalibGpfqConfig(bits=self.bits, block=self.block, scale_method=self.scale_method,
                               act_order=self.act_order, accumulator=self.target())


class GpfqQuantizer(CalibWeightQuantizer[GpfqConfig]):
    name = "gpfq"
    config_type = GpfqConfig
    quantized_inputs = True

    def quantize_kn(self, weight: F32, config: GpfqConfig, ctx: WeightContext) -> KnWeight:
        stats = ctx.input_statistics
        pairs = None if stats is None else stats.observers.get(PAIRS_KIND)
        if pairs is None:
            raise CalibrationError(f"GEMM {ctx.node!r}: gpfq needs the quantized model's inputs paired with the float "
                                   "model's (the WeightSet stage collects them from the calibration feeds; pass "
                                   "feeds to quantize_weights)")
        h, g = pairs.matrices()
        if h.shape != (weight.shape[0], weight.shape[0]):
            raise ConfigError(f"GEMM {ctx.node!r}: GPFQ statistics are {list(h.shape)}, the weight has "
                              f"K={weight.shape[0]} inputs")
        return gpfq(weight, h, g, config.calib())
