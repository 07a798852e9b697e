"""Weight stage: the WeightSet artifact, integer weights and scales of every planned GEMM weight view.

Keys are GEMM node names, with ``#<view>`` for a transformed view (``node#peg0`` for the first PEG group;
the unchanged or FWQ-folded weight of a GEMM has one view). ``bias_shifts`` hold the per-output-channel
amounts the empirical bias correction subtracts from a GEMM's bias (float64, applied by lowering).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from builder.quant.base import QuantizedWeight
from calib.errors import BuildError, suggest

F64 = npt.NDArray[np.float64]


def view_key(node: str, view: str = "") -> str:
    """The WeightSet key of weight ``view`` of GEMM ``node``."""
    return node if not view else f"{node}#{view}"


@dataclass(frozen=True)
class WeightSet:
    """Integer weights (per GEMM view) and bias shifts, ready for lowering."""

    entries: Mapping[str, QuantizedWeight]
    bias_shifts: Mapping[str, F64] = field(default_factory=dict)

    def get(self, key: str) -> QuantizedWeight:
        try:
            return self.entries[key]
        except KeyError:
            raise BuildError(f"the WeightSet has no weight {key!r} (was it made for another plan?)"
                             f"{suggest(key, self.entries)}") from None

    def digest(self) -> str:
        """SHA-256 over every entry's integers, scales and layout, and the bias shifts (in key order)."""
        h = hashlib.sha256()
        for key in sorted(self.entries):
            w = self.entries[key]
            h.update(f"{key}|{w.axis}|{w.bits}|{w.block}|{w.values.shape}".encode())
            h.update(np.ascontiguousarray(w.values).tobytes())
            h.update(np.ascontiguousarray(w.scales).tobytes())
        for key in sorted(self.bias_shifts):
            h.update(key.encode())
            h.update(np.ascontiguousarray(self.bias_shifts[key]).tobytes())
        return h.hexdigest()
