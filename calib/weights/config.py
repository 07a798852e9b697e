"""Weight quantization stage: typed configs of the weight quantizers (one frozen Schema per method).

Decoding (calib.schema.convert) rejects unknown keys; every value is validated on construction, so a bad
config raises ConfigError before any work.
"""

from __future__ import annotations

from enum import StrEnum

from calib.errors import ConfigError
from calib.schema import Schema
from calib.weights.accumulator import AccumulatorTarget, min_accumulator_bits
from calib.weights.grid import check_bits


class ScaleMethod(StrEnum):
    """How a scale is chosen for each channel (or block): ``max`` = amax / qmax; ``mse`` = the shrink of amax
    (1.00, 0.99, ..., 0.20) that minimises the squared rounding error, ties to the larger scale."""

    MAX = "max"
    MSE = "mse"


class WeightQuantBase(Schema, frozen=True):
    """Options every weight quantizer shares: bits (2..8), per block of B inputs or per channel, scale method."""

    bits: int = 8
    block: int | None = None
    scale_method: ScaleMethod = ScaleMethod.MAX

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.block is not None and (isinstance(self.block, bool) or self.block < 1):
            raise ConfigError(f"weight block {self.block!r} must be a positive int (or None for per channel)")


class RtnConfig(WeightQuantBase, frozen=True):
    """Round to nearest (half to even) onto the grid, scales by ``scale_method``."""


def _check_accumulator(config: OptqConfig | GpfqConfig) -> None:
    target = config.accumulator
    if target is None:
        return
    needed = min_accumulator_bits(config.bits, target.activation_bits, target.signed_inputs)
    if target.accumulator_bits < needed:
        raise ConfigError(f"accumulator bits {target.accumulator_bits} cannot hold even a one-element dot product "
                          f"of {config.bits}-bit weights and {target.activation_bits}-bit inputs; need at least "
                          f"{needed}")


class OptqConfig(WeightQuantBase, frozen=True):
    """OPTQ/GPTQ (Frantar et al. 2022, arXiv 2210.17323) with optional AXE (``accumulator``).

    ``percdamp``: damping lambda = percdamp * mean(diag H). ``lazy_block``: columns per lazy batch update.
    ``act_order``: visit inputs by descending diag(H). ``static_block_scales``: fix per-block scales before the
    pass (otherwise each block's scales are recomputed from the updated weights when the pass reaches it); it
    is required with act-order or AXE, which both need every scale before the pass.
    """

    percdamp: float = 0.01
    lazy_block: int = 128
    act_order: bool = False
    static_block_scales: bool = False
    accumulator: AccumulatorTarget | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.percdamp <= 10.0:
            raise ConfigError(f"percdamp {self.percdamp!r} out of range; allowed 0..10 (typical 0.01)")
        if isinstance(self.lazy_block, bool) or self.lazy_block < 1:
            raise ConfigError(f"lazy_block {self.lazy_block!r} must be a positive int (typical 128)")
        if self.block is not None and not self.static_block_scales:
            needs = "act_order" if self.act_order else "an accumulator target" if self.accumulator else None
            if needs:
                raise ConfigError(f"per-block scales with {needs} must be fixed before the pass: "
                                  "set static_block_scales=True")
        _check_accumulator(self)


class GpfqConfig(WeightQuantBase, frozen=True):
    """GPFQ (Lybrand & Saab 2021, arXiv 2010.15979; Zhang, Zhou & Saab 2023, arXiv 2201.11113) with optional AXE.

    Scales are always fixed before the pass, from the float weight.
    """

    act_order: bool = False
    accumulator: AccumulatorTarget | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_accumulator(self)


WeightQuantConfig = RtnConfig | OptqConfig | GpfqConfig
