"""Calibration stage: the Statistics artifact (per tensor, the mergeable states of its observers).

``calibrate`` produces one :class:`Statistics` per model and data; every range method, every recipe and the
outlier report are decided from it later without running the model again (``ranges.json`` and
``calibration.cache`` are views of it). Statistics of data shards merge exactly: the merge of shards equals
one pass over all of their batches, bit for bit (calib.observers), whatever the grouping.

On disk it is one ``.npz`` file, written atomically: ``__meta__`` holds the :class:`StatisticsMeta` JSON
(strict, versioned) and ``{index}|{kind}.{key}`` the state arrays of tensor number ``index``. Loading needs no
pickle. An unfinished file (``complete: false``) is the checkpoint an interrupted calibration resumes from.

Non-finite values, per batch and tensor: NaN or +inf raise CalibrationError naming the tensor and batch;
-inf or values <= -1e30 (additive attention-mask sentinels) are excluded from every statistic and counted in
``mask_values`` when allowed, else an error.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

from calib.artifact_io import atomic_write_bytes
from calib.errors import CalibrationError, ConfigError, suggest
from calib.histogram import DEFAULT_BINS
from calib.layout import TensorLayout
from calib.observers import (
    MASK_SENTINEL,
    OBSERVER_KINDS,
    DimRangeObserver,
    FirstRows,
    HistogramObserver,
    MinMaxObserver,
    RowsView,
    Scratch,
    State,
    TokenObserver,
    TokenRows,
)
from calib.schema import Schema, convert, to_json

STATISTICS_VERSION = 1
# What `calibrate` collects for every tensor: what the range methods and the built-in recipes read. Other kinds
# (``sparq_pairs``, ``hessian``) are collected on demand, in a second pass over the same batches, when a plan
# needs them (builder.pipeline.plan_model, builder.weights.hessians.collect_missing).
DEFAULT_KINDS = ("minmax", "dims", "tokens", "histogram")
_DIGEST_MODULUS = 1 << 256

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass
class TensorStatistics:
    """All observers of one tensor (mutable accumulator, serializable and mergeable)."""

    tensor: str
    observers: dict[str, Any]  # kind -> observer (calib.observers.Observer)
    mask_values: int = 0  # mask sentinels excluded
    allow_mask_values: bool = True

    @classmethod
    def create(cls, tensor: str, kinds: Sequence[str] = DEFAULT_KINDS, *, bins: int = DEFAULT_BINS,
               allow_mask_values: bool = True) -> TensorStatistics:
        """Observers of ``kinds`` in the canonical order of :data:`OBSERVER_KINDS`."""
        unknown = [k for k in kinds if k not in OBSERVER_KINDS]
        if unknown:
            raise ConfigError(f"unknown observer kind {unknown[0]!r}; known: {', '.join(OBSERVER_KINDS)}"
                              f"{suggest(unknown[0], OBSERVER_KINDS)}")
        observers: dict[str, Any] = {}
        for kind, kind_type in OBSERVER_KINDS.items():
            if kind in kinds:
                observers[kind] = HistogramObserver.with_bins(bins) if kind_type is HistogramObserver else kind_type()
        return cls(tensor=tensor, observers=observers, allow_mask_values=allow_mask_values)

    # -- typed access to the built-in kinds --------------------------------------------------------------
    @property
    def minmax(self) -> MinMaxObserver:
        observer: MinMaxObserver = self.observers["minmax"]
        return observer

    @property
    def histogram(self) -> HistogramObserver:
        observer: HistogramObserver = self.observers["histogram"]
        return observer

    @property
    def dims(self) -> DimRangeObserver | None:
        return self.observers.get("dims")

    @property
    def tokens(self) -> TokenObserver | None:
        return self.observers.get("tokens")

    def get(self, kind: str) -> Any:
        """The observer of ``kind``; CalibrationError naming what was collected when it is missing."""
        try:
            return self.observers[kind]
        except KeyError:
            raise CalibrationError(f"tensor {self.tensor!r} has no {kind!r} statistics (collected: "
                                   f"{', '.join(self.observers) or 'none'}); calibrate with that observer") from None

    def update(self, rows: F32, row_ids: I64 | None = None, *, batch: int = 0, scratch: Scratch | None = None,
               token_rows: TokenRows | None = None, first_rows: FirstRows | None = None) -> None:
        """Fold one batch of valid rows [N, D] (padding already removed).

        ``scratch`` lends reusable buffers (one per folding thread); ``token_rows`` are the token observer's row
        maxima already reduced per position (calib.layout.token_row_max). Neither changes the result.
        """
        if rows.size == 0:
            return
        if rows.dtype != np.float32:
            rows = rows.astype(np.float32)
        view = RowsView(rows, row_ids, scratch=scratch, token_rows=token_rows, first_rows=first_rows)
        lo, hi = view.bounds
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= MASK_SENTINEL:
            view = self._masked_view(rows, row_ids, batch)
        for observer in self.observers.values():
            observer.update(view)

    def _masked_view(self, rows: F32, row_ids: I64 | None, batch: int) -> RowsView:
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
        return RowsView(rows, row_ids, sentinel)

    def merge(self, other: TensorStatistics) -> TensorStatistics:
        if other.tensor != self.tensor or other.observers.keys() != self.observers.keys():
            raise CalibrationError(f"cannot merge statistics of {other.tensor!r} ({', '.join(other.observers)}) "
                                   f"into {self.tensor!r} ({', '.join(self.observers)})")
        for kind, observer in self.observers.items():
            observer.merge(other.observers[kind])
        self.mask_values += other.mask_values
        return self

    def state(self) -> State:
        """Flat arrays (``<kind>.<key>``) that :meth:`from_state` turns back into equal statistics."""
        out: State = {"mask_values": np.asarray(self.mask_values, dtype=np.int64),
                      "allow_mask_values": np.asarray(self.allow_mask_values)}
        for kind, observer in self.observers.items():
            out[f"{kind}."] = np.asarray(True)  # present even when its state is empty
            out.update({f"{kind}.{k}": v for k, v in observer.state().items()})
        return out

    @classmethod
    def from_state(cls, tensor: str, state: Mapping[str, npt.NDArray[Any]]) -> TensorStatistics:
        observers: dict[str, Any] = {}
        for kind, kind_type in OBSERVER_KINDS.items():
            prefix = f"{kind}."
            if prefix in state:
                observers[kind] = kind_type.from_state(
                    {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k != prefix})
        return cls(tensor=tensor, observers=observers, mask_values=int(state["mask_values"]),
                   allow_mask_values=bool(state["allow_mask_values"]))


class BatchRange(Schema, frozen=True):
    """Global batch indices [start, stop) covered by a Statistics."""

    start: int
    stop: int


class StatisticsMeta(Schema, frozen=True, kw_only=True):
    """What a Statistics was collected from and how far it got (the ``__meta__`` of the .npz file)."""

    version: int = STATISTICS_VERSION
    model_sha256: str
    tensors: tuple[str, ...]
    kinds: dict[str, tuple[str, ...]]  # tensor -> observer kinds
    options: dict[str, Any]  # collector options that change the states (bins, mask handling, inputs)
    layouts: dict[str, TensorLayout]
    batches: tuple[BatchRange, ...]  # covered global batch ranges, sorted and coalesced
    samples: int
    data_digest: str  # sum over batches of sha256(index, batch) mod 2**256: order-free, so shards merge
    data_source: str = ""
    complete: bool = False

    @property
    def num_batches(self) -> int:
        return sum(r.stop - r.start for r in self.batches)


def batch_digest(index: int, feed: Mapping[str, npt.NDArray[Any]]) -> int:
    """The digest of global batch ``index`` as an integer (summed into :attr:`StatisticsMeta.data_digest`)."""
    digest = hashlib.sha256(str(index).encode())
    for name in sorted(feed):
        arr = np.ascontiguousarray(feed[name])
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
        digest.update(arr.tobytes())
    return int.from_bytes(digest.digest(), "big")


def combine_digests(a: str, b: str | int) -> str:
    """(a + b) mod 2**256 as 64 hex digits (``a`` hex, ``b`` hex or int)."""
    value = int(a or "0", 16) + (b if isinstance(b, int) else int(b or "0", 16))
    return f"{value % _DIGEST_MODULUS:064x}"


def coalesce(ranges: Iterable[BatchRange]) -> tuple[BatchRange, ...]:
    """Sorted, merged batch ranges; overlapping ranges are an error (a batch counted twice)."""
    out: list[BatchRange] = []
    for r in sorted(ranges, key=lambda r: (r.start, r.stop)):
        if out and r.start < out[-1].stop:
            raise CalibrationError(f"statistics overlap: batches [{r.start}, {r.stop}) and "
                                   f"[{out[-1].start}, {out[-1].stop}) were both collected")
        if out and r.start == out[-1].stop:
            out[-1] = BatchRange(start=out[-1].start, stop=r.stop)
        elif r.stop > r.start:
            out.append(r)
    return tuple(out)


@dataclass
class Statistics:
    """Observer states of every calibrated tensor of one model on one data set (mergeable)."""

    meta: StatisticsMeta
    tensors: dict[str, TensorStatistics] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.tensors) != set(self.meta.tensors):
            raise CalibrationError(f"statistics of {len(self.tensors)} tensors do not match their metadata "
                                   f"({len(self.meta.tensors)} tensors)")

    def subset(self, names: Iterable[str]) -> Statistics:
        """The statistics of ``names`` only (same data and options)."""
        wanted = set(names)
        keep = tuple(n for n in self.meta.tensors if n in wanted)
        meta = msgspec.structs.replace(self.meta, tensors=keep, kinds={n: self.meta.kinds[n] for n in keep
                                                                         if n in self.meta.kinds},
                                       layouts={n: v for n, v in self.meta.layouts.items() if n in keep})
        return Statistics(meta=meta, tensors={n: self.tensors[n] for n in keep})

    @property
    def samples(self) -> int:
        return self.meta.samples

    @property
    def batches(self) -> int:
        return self.meta.num_batches

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def get(self, name: str) -> TensorStatistics:
        """The statistics of tensor ``name``; a clear error with close matches when it was not calibrated."""
        try:
            return self.tensors[name]
        except KeyError:
            raise CalibrationError(f"no calibration statistics for tensor {name!r}"
                                   f"{suggest(name, self.tensors)}") from None

    def merge(self, other: Statistics) -> Statistics:
        """Fold ``other`` (statistics of other batches of the same data, model and options) into self."""
        a, b = self.meta, other.meta
        for what, ok in (("model", a.model_sha256 == b.model_sha256), ("tensors", a.tensors == b.tensors),
                         ("observers", a.kinds == b.kinds), ("options", a.options == b.options),
                         ("layouts", a.layouts == b.layouts or not b.batches or not a.batches)):
            if not ok:
                raise CalibrationError(f"cannot merge statistics collected with a different {what}")
        for name, stats in other.tensors.items():
            self.tensors[name].merge(stats)
        self.meta = StatisticsMeta(
            model_sha256=a.model_sha256, tensors=a.tensors, kinds=a.kinds, options=a.options,
            layouts=a.layouts or b.layouts, batches=coalesce(a.batches + b.batches), samples=a.samples + b.samples,
            data_digest=combine_digests(a.data_digest, b.data_digest), data_source=a.data_source or b.data_source,
            complete=a.complete and b.complete)
        return self

    def state_bytes(self) -> bytes:
        """The canonical ``.npz`` bytes (equal statistics give equal bytes)."""
        arrays: dict[str, npt.NDArray[Any]] = {"__meta__": np.asarray(to_json(self.meta))}
        for index, name in enumerate(self.meta.tensors):
            for key, value in self.tensors[name].state().items():
                arrays[f"{index}|{key}"] = np.asarray(value)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # np.savez's layout, fixed timestamps
            for key, value in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w", force_zip64=True) as handle:
                    np.lib.format.write_array(handle, value, allow_pickle=False)
        return buffer.getvalue()

    def save(self, path: Path) -> None:
        """Write the statistics to ``path`` atomically."""
        atomic_write_bytes(path, self.state_bytes())

    @classmethod
    def load(cls, path: Path) -> Statistics:
        """Read statistics written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = convert(_json(str(data["__meta__"])), StatisticsMeta, f"statistics {path}")
                per_tensor: dict[int, dict[str, npt.NDArray[Any]]] = {}
                for key in data.files:
                    if key != "__meta__":
                        index, sub = key.split("|", 1)
                        per_tensor.setdefault(int(index), {})[sub] = data[key]
        except (OSError, ValueError, KeyError) as exc:
            raise CalibrationError(f"cannot read calibration statistics {path}: {exc}; delete the file to "
                                   "calibrate afresh (--fresh)") from exc
        if meta.version != STATISTICS_VERSION:
            raise CalibrationError(f"statistics {path} have version {meta.version}; expected {STATISTICS_VERSION}")
        tensors = {name: TensorStatistics.from_state(name, per_tensor.get(i, {}))
                   for i, name in enumerate(meta.tensors)}
        return cls(meta=meta, tensors=tensors)


def _json(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"statistics metadata is not valid JSON: {exc}") from None
