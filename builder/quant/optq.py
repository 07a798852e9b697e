"""Quantizer (weight and lowering stages): OPTQ/GPTQ weights from the Hessian of the GEMM input, optional AXE.

Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ", arXiv 2210.17323 (algorithm 1): the columns of W (our
rows: one input feature each) are rounded one at a time and each rounding error is spread over the
not-yet-quantized inputs through the upper Cholesky factor of H^-1, H = 2/n X^T X of the GEMM input X over the
calibration tokens (dampened by ``percdamp`` * mean(diag H)), in lazy batches of ``lazy_block`` inputs;
``act_order`` visits inputs by descending diag(H). With ``accumulator_bits`` the AXE constraint (Colbert et al.
2024, arXiv 2409.17092, section 4) keeps every tile of ``tile`` inputs safe in a signed P-bit accumulator.
The numerics are calib.weights.optq; here they meet the registry and the stored layout.

H comes from the ``hessian`` observer of the GEMM's input (calib.hessian_observer), collected on the float
model over the calibration texts (builder.weights.inputs: a second collection pass when the Statistics lack it).
One K x K matrix per distinct GEMM input; the GEMMs reading one tensor share it. When the input quantizer
rescales or splits the weight (HERO FWQ, SmoothQuant, PEG), the stage maps H to that view's inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from builder.quant.base import WeightContext
from builder.quant.weight_common import AxeOptions, CalibWeightQuantizer, ScaleName
from calib.errors import CalibrationError, ConfigError
from calib.weights import OptqConfig as CalibOptqConfig
from calib.weights import QuantizedWeight as KnWeight
from calib.weights import optq

if TYPE_CHECKING:
    from builder.quant.base import F32
    from calib.weights.grid import F64

HESSIAN_KIND = "hessian"
MAX_FIRST_WEIGHT = 1e6


class OptqConfig(AxeOptions, frozen=True, kw_only=True):
    """OPTQ options (plus ``bits``, ``block``, ``scale``, ``act_order`` and the AXE options of AxeOptions).

    Defaults differ from round-to-nearest's: ``act_order`` on and ``scale`` ``auto``, which is ``mse`` -- or
    ``max`` under an accumulator constraint. At 4 bits they are what makes OPTQ worth its pass (MiniLM W4A16 g128
    cosine 0.9785 -> 0.9857, W4A8 0.9581 -> 0.9754; SmolLM2 W4A16 g64 perplexity +37% -> +15% over FP32); at 8
    bits they change nothing measurable (W8A8 0.9929 -> 0.9930). MSE scales are smaller, so the same weights take
    larger integers and AXE's L1 budget (in integer units) clips more of them: MiniLM W4A8 AXE P16 T128 with
    act-order has cosine 0.9163 with MSE scales and 0.9620 with max scales (1,000-sentence probe subset).
    OPTQ's MSE search weighs each input's rounding error by its Hessian diagonal H_kk (calib.weights.optq): on
    SmolLM2 W4A16 g32 (128 x 256 calibration tokens) perplexity went from +7.44% to +5.80% over FP32.

    ``first_token_weight``: each calibration text's first token counts this many times in H (0..1e6; 1: once,
    as every other token). Every later token attends to the first one (the attention sink of decoders), so an
    error in its activations reaches every output of the text, which a plain X^T X does not see. The Hessian
    statistics keep the first-token rows, so the weight is applied when H is read, without another pass.

    ``percdamp``: damping percdamp * mean(diag H), 0..10 (default 0.01). ``lazy_block``: inputs per lazy batch
    update (128). ``static_scales``: with a ``block``, fix every block's scale from the float weight before the
    pass (otherwise each block's scale is taken from the updated weights when the pass reaches it); always on
    with ``act_order`` or AXE, which need every scale up front.
    """

    act_order: bool = True
    scale: ScaleName = "auto"
    first_token_weight: float = 1.0
    percdamp: float = 0.01
    lazy_block: int = 128
    static_scales: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.calib()  # percdamp and lazy_block ranges
        weight = self.first_token_weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= MAX_FIRST_WEIGHT:
            raise ConfigError(f"first_token_weight {weight!r} must be a number in 0..{MAX_FIRST_WEIGHT:g} (1: every "
                              "token counts once)")

    def auto_scale(self) -> Literal["max", "mse"]:
        return "max" if self.accumulator_bits is not None else "mse"

    def calib(self) -> CalibOptqConfig:
        static = self.static_scales or (self.block is not None
                                        and (self.act_order or self.accumulator_bits is not None))
        return CalibOptqConfig(bits=self.bits, block=self.block, scale_method=self.scale_method,
                               percdamp=self.percdamp, lazy_block=self.lazy_block, act_order=self.act_order,
                               static_block_scales=static, accumulator=self.target())


def input_hessian(ctx: WeightContext, quantizer: str, k: int, first_weight: float = 1.0) -> F64:
    """OPTQ's H of the GEMM input (from its ``hessian`` statistics, each text's first-token rows weighed
    ``first_weight`` times), checked to be [K, K]."""
    stats = ctx.input_statistics
    if stats is None or HESSIAN_KIND not in stats.observers:
        tensor = "its input" if stats is None else f"its input {stats.tensor!r}"
        raise CalibrationError(
            f"GEMM {ctx.node!r}: weight quantizer {quantizer} needs the Hessian (observer {HESSIAN_KIND!r}) of "
            f"{tensor}; collect it with builder.pipeline.calibrate_weight_inputs (the CLI does so from the "
            "calibration-data flags)")
    matrix: F64 = np.asarray(stats.observers[HESSIAN_KIND].matrix(first_weight), dtype=np.float64)
    if matrix.shape != (k, k):
        raise ConfigError(f"GEMM {ctx.node!r}: the Hessian of {stats.tensor!r} is {list(matrix.shape)}, the weight "
                          f"has K={k} inputs (statistics of another model?)")
    return matrix


class OptqQuantizer(CalibWeightQuantizer[OptqConfig]):
    name = "optq"
    config_type = OptqConfig
    observers = (HESSIAN_KIND,)

    def quantize_kn(self, weight: F32, config: OptqConfig, ctx: WeightContext) -> KnWeight:
        return optq(weight, input_hessian(ctx, self.name, int(weight.shape[0]), config.first_token_weight),
                    config.calib())
