"""Calibration stage: streaming, mergeable Hessian observers for OPTQ and GPFQ (one K x K state per GEMM input).

* :class:`HessianObserver` accumulates X^T X of a GEMM input X [n, K] (rows = tokens, padding excluded) and
  reads back OPTQ's H = 2/n X^T X (Frantar et al. 2022, arXiv 2210.17323, section 3).
* :class:`GpfqObserver` accumulates, from the float model's input X and the quantized model's input X~ of the
  same rows, H~ = X~^T X~ and G = X~^T X (the matrices of brevitas' GPFQ, ``src/brevitas/graph/gpfq.py`` v0.12.1;
  Zhang, Zhou & Saab 2023, arXiv 2201.11113), read back divided by n.

Exactness: each batch's contribution is computed in float64 (the inputs are float32, so every product is exact
in float64; the in-batch sum is a deterministic function of the batch) and added to a
:class:`calib.exact_sum.ExactSum`, whose integer limbs make the total independent of how batches are grouped
into shards or in which order shards are merged. Merge of shards therefore equals one pass, bit for bit.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError
from calib.exact_sum import DEFAULT_FRAC_BITS, ExactSum

State = dict[str, npt.NDArray[np.generic]]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def _check_rows(rows: npt.NDArray[np.generic], features: int, what: str) -> F64:
    """``rows`` as float64 [n, K]; only float32 input is accepted (float64 products would not be exact)."""
    if rows.dtype != np.float32:
        raise CalibrationError(f"{what} rows must be float32, got {rows.dtype}")
    if rows.ndim != 2 or rows.shape[1] != features:
        raise CalibrationError(f"{what} rows must have shape [n, {features}], got {list(rows.shape)}")
    if not np.all(np.isfinite(rows)):
        raise CalibrationError(f"{what} rows contain NaN or inf")
    return rows.astype(np.float64)


def _check_state_keys(state: State, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CalibrationError(f"{what} state lacks {missing}; has {sorted(state)}")


def _sub_state(state: State, prefix: str) -> State:
    return {key: state[f"{prefix}.{key}"] for key in ("hi", "lo", "frac_bits")}


class HessianObserver:
    """Streaming X^T X of a GEMM input with K features; :meth:`matrix` gives OPTQ's H = 2/n X^T X.

    Beside the exact sum it keeps the first-token row of every sample with the sample's global id (``first``:
    float32 rows sorted by id, so shards merge to the same arrays in any order): :meth:`matrix` can weigh those
    rows ``first_weight`` times, H = 2/n (X^T X + (w - 1) X0^T X0). The first token of a text is the one every
    later token attends to (the attention sink of decoders), so an error in its activations reaches every
    output; a plain X^T X counts it once in n.
    """

    def __init__(self, features: int, frac_bits: int = DEFAULT_FRAC_BITS) -> None:
        if features < 1:
            raise CalibrationError(f"a Hessian needs at least one input feature, got {features}")
        self.features = int(features)
        self.count = 0
        self._sum = ExactSum((self.features, self.features), frac_bits=frac_bits)
        # first-token rows in chunks of ascending, disjoint ids (appended as batches arrive); joined when read
        self._first: list[tuple[F32, npt.NDArray[np.int64]]] = []

    def update(self, rows: F32, first_rows: F32 | None = None, first_ids: npt.NDArray[np.int64] | None = None
               ) -> None:
        """Add the rows [n, K] (float32) of one batch, and optionally its samples' first-token rows [m, K] with
        their global sample ids [m]."""
        x = _check_rows(rows, self.features, "Hessian")
        if x.shape[0] == 0:
            return
        self._sum.add(x.T @ x)
        self.count += int(x.shape[0])
        if first_rows is not None and first_ids is not None:
            _check_rows(first_rows, self.features, "first-token")
            # copies: the chunk is kept, and the caller's arrays may be views of buffers it reuses
            self._add_first(np.array(first_rows, dtype=np.float32), np.array(first_ids, dtype=np.int64))

    def _add_first(self, rows: F32, ids: npt.NDArray[np.int64]) -> None:
        if rows.shape[0] != ids.shape[0]:
            raise CalibrationError(f"{rows.shape[0]} first-token rows but {ids.shape[0]} sample ids")
        if ids.size == 0:
            return
        ascending = ids.size == 1 or bool(np.all(ids[1:] > ids[:-1]))
        if ascending and (not self._first or int(ids[0]) > int(self._first[-1][1][-1])):
            self._first.append((rows, ids))  # batches in order: no copy of what came before
            return
        all_ids = np.concatenate([self.first_ids, ids])
        order = np.argsort(all_ids, kind="stable")
        all_ids = all_ids[order]
        if all_ids.size > 1 and bool(np.any(all_ids[1:] == all_ids[:-1])):
            raise CalibrationError("a sample's first-token row was folded twice (overlapping shards?)")
        self._first = [(np.concatenate([self.first_rows, rows])[order], all_ids)]

    def _joined(self) -> tuple[F32, npt.NDArray[np.int64]]:
        if not self._first:
            return np.zeros((0, self.features), dtype=np.float32), np.zeros(0, dtype=np.int64)
        if len(self._first) > 1:
            self._first = [(np.concatenate([r for r, _ in self._first]), np.concatenate([i for _, i in self._first]))]
        return self._first[0]

    @property
    def first_rows(self) -> F32:
        """The first-token rows [M, K] (float32), by ascending sample id."""
        return self._joined()[0]

    @property
    def first_ids(self) -> npt.NDArray[np.int64]:
        """The global sample ids [M] of :attr:`first_rows`, ascending."""
        return self._joined()[1]

    def merge(self, other: HessianObserver) -> HessianObserver:
        """Fold another shard's observer of the same input into this one; returns self."""
        if other.features != self.features:
            raise CalibrationError(f"cannot merge a Hessian of {other.features} features into one of {self.features}")
        self._sum.merge(other._sum)
        self.count += other.count
        self._add_first(other.first_rows, other.first_ids)
        return self

    def gram(self) -> F64:
        """The exact-summed X^T X as float64 [K, K]."""
        return self._sum.value()

    def matrix(self, first_weight: float = 1.0) -> F64:
        """OPTQ's Hessian H = 2/n (X^T X + (first_weight - 1) X0^T X0) (float64 [K, K]); X0: the first-token rows."""
        if self.count == 0:
            raise CalibrationError("the Hessian observer has seen no rows")
        if not np.isfinite(first_weight) or first_weight < 0:
            raise CalibrationError(f"first-token weight {first_weight!r} must be finite and >= 0")
        gram = self._sum.value()
        if first_weight != 1.0:
            if self.first_rows.shape[0] == 0:
                raise CalibrationError("first-token weight needs the first-token rows of the calibration texts, and "
                                       "these statistics hold none (collected before they were kept, or the input "
                                       "has no token axis); collect the Hessians again")
            x0 = self.first_rows.astype(np.float64)
            gram = gram + (first_weight - 1.0) * (x0.T @ x0)
        out: F64 = gram * (2.0 / self.count)
        return out

    def state(self) -> State:
        return {f"xtx.{k}": v for k, v in self._sum.state().items()} | {
            "count": np.asarray(self.count, dtype=np.int64), "first.rows": self.first_rows,
            "first.ids": self.first_ids}

    @classmethod
    def from_state(cls, state: State) -> HessianObserver:
        _check_state_keys(state, ("xtx.hi", "xtx.lo", "xtx.frac_bits", "count"), "Hessian")
        total = ExactSum.from_state(_sub_state(state, "xtx"))
        if len(total.shape) != 2 or total.shape[0] != total.shape[1]:
            raise CalibrationError(f"Hessian state is not square: {total.shape}")
        out = cls(total.shape[0], frac_bits=total.frac_bits)
        out._sum = total
        out.count = int(state["count"])
        if "first.rows" in state:  # absent from statistics written before first-token rows were kept
            rows = np.asarray(state["first.rows"], dtype=np.float32)
            ids = np.asarray(state["first.ids"], dtype=np.int64)
            if rows.ndim != 2 or rows.shape[1] != out.features or ids.shape != (rows.shape[0],):
                raise CalibrationError(f"Hessian first-token rows {list(rows.shape)} / ids {list(ids.shape)} do not "
                                       f"fit {out.features} features")
            out._add_first(rows, ids)
        return out


class GpfqObserver:
    """Streaming H~ = X~^T X~ and G = X~^T X for GPFQ from paired quantized-model and float-model rows.

    ``G[i, j] = sum_n X~[n, i] * X[n, j]``: row index on the quantized input, column on the float input.
    """

    def __init__(self, features: int, frac_bits: int = DEFAULT_FRAC_BITS) -> None:
        if features < 1:
            raise CalibrationError(f"GPFQ statistics need at least one input feature, got {features}")
        self.features = int(features)
        self.count = 0
        self._h = ExactSum((self.features, self.features), frac_bits=frac_bits)
        self._g = ExactSum((self.features, self.features), frac_bits=frac_bits)

    def update(self, quant_rows: F32, float_rows: F32) -> None:
        """Add one batch: the quantized model's input rows X~ and the float model's rows X of the same tokens."""
        xq = _check_rows(quant_rows, self.features, "GPFQ quantized-input")
        xf = _check_rows(float_rows, self.features, "GPFQ float-input")
        if xq.shape[0] != xf.shape[0]:
            raise CalibrationError(f"GPFQ rows must pair up: {xq.shape[0]} quantized-input rows, "
                                   f"{xf.shape[0]} float-input rows")
        if xq.shape[0] == 0:
            return
        self._h.add(xq.T @ xq)
        self._g.add(xq.T @ xf)
        self.count += int(xq.shape[0])

    def merge(self, other: GpfqObserver) -> GpfqObserver:
        if other.features != self.features:
            raise CalibrationError(f"cannot merge GPFQ statistics of {other.features} features into "
                                   f"{self.features}")
        self._h.merge(other._h)
        self._g.merge(other._g)
        self.count += other.count
        return self

    def matrices(self) -> tuple[F64, F64]:
        """(H~, G) divided by the row count, float64 [K, K] each."""
        if self.count == 0:
            raise CalibrationError("the GPFQ observer has seen no rows")
        return self._h.value() / self.count, self._g.value() / self.count

    def state(self) -> State:
        out: State = {f"h.{k}": v for k, v in self._h.state().items()}
        out |= {f"g.{k}": v for k, v in self._g.state().items()}
        out["count"] = np.asarray(self.count, dtype=np.int64)
        return out

    @classmethod
    def from_state(cls, state: State) -> GpfqObserver:
        keys = (*(f"{p}.{k}" for p in ("h", "g") for k in ("hi", "lo", "frac_bits")), "count")
        _check_state_keys(state, keys, "GPFQ")
        h, g = ExactSum.from_state(_sub_state(state, "h")), ExactSum.from_state(_sub_state(state, "g"))
        if h.shape != g.shape or h.frac_bits != g.frac_bits or len(h.shape) != 2 or h.shape[0] != h.shape[1]:
            raise CalibrationError(f"GPFQ state: H~ {h.shape} and G {g.shape} must be equal square matrices")
        out = cls(h.shape[0], frac_bits=h.frac_bits)
        out._h, out._g = h, g
        out.count = int(state["count"])
        return out
