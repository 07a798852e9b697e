"""Calibration stage: the ``hessian`` observer kind (X^T X of a GEMM input, for OPTQ), on the RowsView protocol.

An adapter of :class:`calib.weights.hessian.HessianObserver` to the collector's observer protocol
(calib.observers.Observer): the collector folds each batch's valid rows [n, K] of a GEMM input (padding
excluded) with :meth:`HessianKind.update`; the state is the exact fixed-point sum of X^T X (calib.exact_sum),
so shards merge bit for bit in any grouping and an interrupted collection resumes from its checkpoint.
:meth:`HessianKind.matrix` reads back OPTQ's H = 2/n X^T X (Frantar et al. 2022, arXiv 2210.17323, section 3).

One K x K state per observed tensor: the collector creates the kind only for the GEMM inputs a weight
quantizer asks for (``CollectOptions.extra_kinds``), and GEMMs that read one tensor share it. A GEMM input never
carries additive attention-mask sentinels (-inf, <= -1e30); a batch that has them is refused rather than
folded with the sentinels left out (which would make X^T X describe another tensor).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError
from calib.weights.hessian import HessianObserver

if TYPE_CHECKING:
    from calib.observers import RowsView

State = dict[str, npt.NDArray[np.generic]]
F64 = npt.NDArray[np.float64]


class HessianKind:
    """Streaming X^T X of one tensor's rows; empty until the first batch fixes K (the last axis)."""

    kind: ClassVar[str] = "hessian"

    def __init__(self, observer: HessianObserver | None = None) -> None:
        self.observer = observer

    def update(self, view: RowsView) -> None:
        if view.sentinel is not None:
            raise CalibrationError("a Hessian (X^T X of a GEMM input) cannot exclude attention-mask sentinels: the "
                                   f"tensor has {int(view.sentinel.sum())} values <= -1e30 or -inf; it is not the "
                                   "input of a weight GEMM")
        rows = view.rows
        if rows.ndim != 2 or rows.shape[0] == 0:
            return
        if self.observer is None:
            self.observer = HessianObserver(int(rows.shape[1]))
        first = view.first_rows
        self.observer.update(np.asarray(rows, dtype=np.float32), None if first is None else first.rows,
                             None if first is None else first.ids)

    def merge(self, other: HessianKind) -> HessianKind:
        if other.observer is None:
            return self
        if self.observer is None:  # a copy: later updates of self must not reach other
            self.observer = HessianObserver.from_state(other.observer.state())
        else:
            self.observer.merge(other.observer)
        return self

    @property
    def count(self) -> int:
        """Rows folded so far."""
        return 0 if self.observer is None else self.observer.count

    @property
    def features(self) -> int | None:
        """K, once a batch was seen."""
        return None if self.observer is None else self.observer.features

    def matrix(self, first_weight: float = 1.0) -> F64:
        """OPTQ's H = 2/n X^T X (float64 [K, K]), the first-token rows weighed ``first_weight`` times
        (calib.weights.hessian.HessianObserver.matrix); CalibrationError before any row."""
        if self.observer is None:
            raise CalibrationError("the Hessian observer has seen no rows")
        return self.observer.matrix(first_weight)

    def state(self) -> State:
        return {} if self.observer is None else self.observer.state()

    @classmethod
    def from_state(cls, state: State) -> HessianKind:
        return cls(HessianObserver.from_state(state) if state else None)
