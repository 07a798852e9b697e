"""Calibration stage: the observers of one tensor, fed with its valid rows batch by batch.

Non-finite handling, per batch and tensor:

* NaN or +inf  -> CalibrationError naming the tensor and batch (never a silent infinite scale);
* -inf or values <= -1e30 (additive attention-mask sentinels such as float32 min) -> excluded from every
  statistic and counted in ``mask_values`` when ``allow_mask_values`` is set, else an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError
from calib.histogram import DEFAULT_NUM_BINS
from calib.observers import DimRangeObserver, HistogramObserver, MinMaxObserver, State, TokenObserver

MASK_SENTINEL = -1e30  # values at or below this are additive-mask sentinels (float32 min, -inf)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass
class TensorStats:
    """All observers of one tensor (mutable accumulator, serializable and mergeable)."""

    tensor: str
    minmax: MinMaxObserver = field(default_factory=MinMaxObserver)
    histogram: HistogramObserver = field(default_factory=HistogramObserver)
    dims: DimRangeObserver | None = field(default_factory=DimRangeObserver)
    tokens: TokenObserver | None = None
    mask_values: int = 0  # mask sentinels excluded
    allow_mask_values: bool = True

    @classmethod
    def create(cls, tensor: str, *, num_bins: int = DEFAULT_NUM_BINS, per_dim: bool = True,
               per_token: bool = False, allow_mask_values: bool = True) -> TensorStats:
        return cls(tensor=tensor, histogram=HistogramObserver.with_bins(num_bins),
                   dims=DimRangeObserver() if per_dim else None, tokens=TokenObserver() if per_token else None,
                   allow_mask_values=allow_mask_values)

    def update(self, rows: F32, row_ids: I64 | None = None, *, batch: int = 0) -> None:
        """Fold one batch of valid rows [N, D] (padding already removed)."""
        if rows.size == 0:
            return
        if rows.dtype != np.float32:
            rows = rows.astype(np.float32)
        dim_lo = dim_hi = None
        if self.dims is not None:
            dim_lo, dim_hi = rows.min(axis=0), rows.max(axis=0)
            lo, hi = float(dim_lo.min()), float(dim_hi.max())
        else:
            lo, hi = float(rows.min()), float(rows.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= MASK_SENTINEL:
            self._update_nonfinite(rows, row_ids, batch)
            return
        self.minmax.update(rows, lo, hi)
        if self.dims is not None:
            self.dims.update(rows, dim_lo, dim_hi)
        abs_rows = np.abs(rows)
        if self.tokens is not None and row_ids is not None:
            self.tokens.update_rows(abs_rows.max(axis=1), row_ids)
        self.histogram.update_abs(abs_rows, max(-lo, hi))

    def _update_nonfinite(self, rows: F32, row_ids: I64 | None, batch: int) -> None:
        nan = int(np.isnan(rows).sum())
        pos_inf = int(np.isposinf(rows).sum())
        if nan or pos_inf:
            raise CalibrationError(
                f"tensor {self.tensor!r} has {nan} NaN and {pos_inf} +inf values in calibration batch {batch}; "
                "the model or its input produces non-finite activations, so no finite range exists"
            )
        sentinel = rows <= MASK_SENTINEL
        count = int(sentinel.sum())
        if not self.allow_mask_values:
            raise CalibrationError(
                f"tensor {self.tensor!r} has {count} values <= {MASK_SENTINEL:g} or -inf in calibration batch "
                f"{batch}; allow attention-mask sentinels or calibrate a tensor that does not carry the mask"
            )
        self.mask_values += count
        values = rows[~sentinel]
        if values.size:
            lo, hi = float(values.min()), float(values.max())
            self.minmax.update(values, lo, hi)
            self.histogram.update_abs(np.abs(values), max(-lo, hi))
        if self.dims is not None:  # per-dim ranges over the finite entries only
            finite = np.where(sentinel, np.nan, rows)
            keep = ~np.all(sentinel, axis=0)
            lo_d = np.full(rows.shape[1], np.inf)
            hi_d = np.full(rows.shape[1], -np.inf)
            lo_d[keep] = np.nanmin(finite[:, keep], axis=0)
            hi_d[keep] = np.nanmax(finite[:, keep], axis=0)
            self.dims.update(rows, lo_d.astype(np.float32), hi_d.astype(np.float32))
        if self.tokens is not None and row_ids is not None:
            row_max = np.where(sentinel, 0.0, np.abs(rows)).max(axis=1)
            self.tokens.update_rows(row_max, row_ids)

    def merge(self, other: TensorStats) -> TensorStats:
        if other.tensor != self.tensor:
            raise CalibrationError(f"cannot merge statistics of {other.tensor!r} into {self.tensor!r}")
        self.minmax.merge(other.minmax)
        self.histogram.merge(other.histogram)
        if self.dims is not None and other.dims is not None:
            self.dims.merge(other.dims)
        if self.tokens is not None and other.tokens is not None:
            self.tokens.merge(other.tokens)
        self.mask_values += other.mask_values
        return self

    def state(self) -> State:
        """Flat arrays (prefixed keys) that :meth:`from_state` turns back into equal statistics."""
        out: State = {"mask_values": np.asarray(self.mask_values, dtype=np.int64),
                      "allow_mask_values": np.asarray(self.allow_mask_values)}
        out.update({f"minmax.{k}": v for k, v in self.minmax.state().items()})
        out.update({f"hist.{k}": v for k, v in self.histogram.state().items()})
        if self.dims is not None:
            out["has_dims"] = np.asarray(True)
            out.update({f"dims.{k}": v for k, v in self.dims.state().items()})
        if self.tokens is not None:
            out.update({f"tokens.{k}": v for k, v in self.tokens.state().items()})
        return out

    @classmethod
    def from_state(cls, tensor: str, state: State) -> TensorStats:
        def sub(prefix: str) -> State:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        tokens = sub("tokens.")
        return cls(
            tensor=tensor,
            minmax=MinMaxObserver.from_state(sub("minmax.")),
            histogram=HistogramObserver.from_state(sub("hist.")),
            dims=DimRangeObserver.from_state(sub("dims.")) if "has_dims" in state else None,
            tokens=TokenObserver.from_state(tokens) if tokens else None,
            mask_values=int(state["mask_values"]),
            allow_mask_values=bool(state["allow_mask_values"]),
        )
