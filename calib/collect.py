"""Calibration stage: the collector (ONNX Runtime with intermediate tensors exposed -> observers).

One ONNX Runtime session runs a copy of the model whose graph outputs include every requested tensor.
Batches stream through: each batch's activations are folded into the observers and dropped, so memory is
bounded by one batch. Padding is excluded using the attention mask and token axes found by a probe run
(calib.layout). The Statistics (calib.statistics) are checkpointed every few batches (atomic write); a run
given the same checkpoint resumes after the last saved batch, after checking that the model, the tensors,
the options and the data consumed so far are the same. A shard of a larger data set passes the global
index of its first batch (``batch_offset``), so that shards collected anywhere merge into exactly the
Statistics of one pass.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from calib import fused
from calib.errors import CalibrationError, ConfigError, suggest
from calib.fold import FUSED, Folder
from calib.histogram import DEFAULT_BINS, AbsHistogram
from calib.layout import TensorLayout, infer_layout, merged_batch_candidate, valid_rows
from calib.outputs import run_unbound
from calib.statistics import (
    DEFAULT_KINDS,
    BatchRange,
    Statistics,
    StatisticsMeta,
    TensorStatistics,
    batch_digest,
    combine_digests,
)

logger = logging.getLogger(__name__)

Feed = Mapping[str, npt.NDArray[Any]]
Progress = Callable[[int, int], None]  # (batches done, samples done)

_ORT_DTYPES = {
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
    "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(bool)": np.bool_,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
}
_FLOAT_TYPES = {"tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"}


@dataclass(frozen=True, kw_only=True)
class CollectOptions:
    """How the collector observes tensors."""

    bins: int = DEFAULT_BINS  # declared histogram grid: at most this many bins over the range (a power of two)
    kinds: tuple[str, ...] = DEFAULT_KINDS  # observer kinds per tensor (dims/tokens only where they apply)
    extra_kinds: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # tensor -> more kinds (hessian)
    allow_mask_values: bool = True  # exclude -inf / <= -1e30 attention-mask sentinels instead of failing
    mask_input: str = "attention_mask"
    ids_input: str = "input_ids"
    checkpoint: Path | None = None  # the Statistics file: resumed when unfinished, reused when complete
    checkpoint_every: int = 4  # batches between checkpoint writes
    batch_offset: int = 0  # global index of the first batch (a shard of a larger data set)
    threads: int = 0  # ONNX Runtime intra-op threads (0: its default)
    fold_threads: int = 0  # threads folding batches into the observers (0: one per core, at most 2)
    data_source: str = "feeds"  # recorded in the Statistics (e.g. "vader:512")
    progress: Progress | None = field(default=None, compare=False)  # called with (batches, samples) per batch

    def __post_init__(self) -> None:
        AbsHistogram(bins=self.bins)  # validates the declared grid
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every {self.checkpoint_every} must be at least 1")
        if self.batch_offset < 0:
            raise ConfigError(f"batch_offset {self.batch_offset} must be >= 0")
        if self.fold_threads < 0 or self.threads < 0:
            raise ConfigError(f"threads {self.threads} and fold_threads {self.fold_threads} must be >= 0 "
                              "(0: automatic)")

    @property
    def fold_thread_count(self) -> int:
        """The number of fold threads this run uses."""
        return self.fold_threads or max(1, min(2, os.cpu_count() or 1))

    def fingerprint(self) -> dict[str, Any]:
        """The options that change observer states (statistics merge only when these agree)."""
        return {"bins": self.bins, "allow_mask_values": self.allow_mask_values,
                "mask_input": self.mask_input, "ids_input": self.ids_input}


@dataclass(frozen=True, kw_only=True)
class CollectResult:
    """A finished collection pass: the Statistics and how many of its batches came from a checkpoint."""

    statistics: Statistics
    resumed_batches: int = 0


def _load_model(model: onnx.ModelProto | Path) -> tuple[onnx.ModelProto, bytes, str]:
    """The model, its serialized bytes and their SHA-256 (the file's hash for a path).

    The file is read once; its hash runs on another thread while the model is parsed (hashlib releases the GIL).
    """
    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
        return model, data, hashlib.sha256(data).hexdigest()
    path = Path(model)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    data = path.read_bytes()
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        try:
            proto = onnx.load_from_string(data)
            if any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer):
                proto = onnx.load(str(path))
                data = proto.SerializeToString()
        except Exception as exc:  # onnx raises DecodeError and others
            raise CalibrationError(f"cannot read ONNX model {path}: {exc}") from exc
        return proto, data, digest.result()


def instrument(model: onnx.ModelProto, model_bytes: bytes, tensors: Sequence[str]) -> bytes:
    """Serialized ``model`` whose graph outputs also include ``tensors`` (checked to be produced by a node).

    Protobuf merges a repeated field across concatenated messages, so appending a serialized
    ``ModelProto(graph=GraphProto(output=[...]))`` adds graph outputs without re-serializing the model.
    The outputs carry no type: ONNX Runtime infers it (checked by :func:`check_float_outputs`).
    """
    if not tensors:
        raise ConfigError("no tensors to calibrate")
    produced = {out for node in model.graph.node for out in node.output if out}
    inputs = {i.name for i in model.graph.input}
    initializers = {init.name for init in model.graph.initializer}
    for name in tensors:
        if name in initializers:
            raise ConfigError(f"tensor {name!r} is a weight initializer, not an activation")
        if name not in produced and name not in inputs:
            raise ConfigError(f"tensor {name!r} is not produced by the model{suggest(name, produced | inputs)}")
    present = {o.name for o in model.graph.output} | inputs
    extra = [onnx.ValueInfoProto(name=name) for name in dict.fromkeys(tensors) if name not in present]
    fragment: bytes = onnx.ModelProto(graph=onnx.GraphProto(output=extra)).SerializeToString()
    return model_bytes + fragment


def check_float_outputs(session: Any, tensors: Sequence[str]) -> None:
    """Every observed tensor must be floating point."""
    types = {o.name: o.type for o in session.get_outputs()} | {i.name: i.type for i in session.get_inputs()}
    for name in tensors:
        if types.get(name) not in _FLOAT_TYPES:
            raise ConfigError(f"tensor {name!r} has type {types.get(name)}; only floating-point activations "
                              "can be calibrated")


def _describe_inputs(session: Any) -> str:
    return ", ".join(f"{i.name} {i.type.removeprefix('tensor(').rstrip(')')} {list(i.shape)}"
                     for i in session.get_inputs())


def validate_feed(session: Any, feed: Feed, batch: int) -> None:
    """Names, dtypes and ranks/fixed dims of ``feed`` must match the model inputs."""
    expected = {i.name: i for i in session.get_inputs()}
    problems = []
    missing = [n for n in expected if n not in feed]
    extra = [n for n in feed if n not in expected]
    if missing:
        problems.append(f"missing {missing}")
    for name in extra:
        problems.append(f"unknown input {name!r}{suggest(name, expected)}")
    for name, info in expected.items():
        if name not in feed:
            continue
        arr = np.asarray(feed[name])
        want = _ORT_DTYPES.get(info.type)
        if want is not None and arr.dtype != want:
            problems.append(f"{name!r} has dtype {arr.dtype}, expected {np.dtype(want)}")
        if len(info.shape) != arr.ndim:
            problems.append(f"{name!r} has shape {list(arr.shape)}, expected rank {len(info.shape)}")
        elif any(isinstance(d, int) and d != s for d, s in zip(info.shape, arr.shape, strict=True)):
            problems.append(f"{name!r} has shape {list(arr.shape)}, expected {list(info.shape)}")
    if problems:
        raise CalibrationError(
            f"calibration batch {batch} does not match the model inputs: {'; '.join(problems)}. "
            f"Expected inputs: {_describe_inputs(session)}{_fixed_dims_hint(expected, feed)}"
        )


def _fixed_dims_hint(expected: Mapping[str, Any], feed: Feed) -> str:
    """What to do about inputs declared with a fixed batch or sequence length that the batches do not have."""
    hints = []
    for name, info in expected.items():
        shape = np.shape(feed[name]) if name in feed else ()
        if len(info.shape) != len(shape) or not shape:
            continue
        if isinstance(info.shape[0], int) and info.shape[0] != shape[0]:
            hints.append(f"The model takes batches of exactly {info.shape[0]}: pass --batch-size {info.shape[0]}")
        if len(shape) >= 2 and isinstance(info.shape[1], int) and info.shape[1] != shape[1]:
            hints.append(f"Input {name!r} has a fixed length of {info.shape[1]}: export the model with a dynamic "
                         "sequence axis (batches are padded to their own longest text)")
    return "".join(f". {hint}" for hint in dict.fromkeys(hints))


def _resized(value: npt.NDArray[Any], batch: int, seq: int, step: int) -> npt.NDArray[Any]:
    """``value`` ``step`` (+1 or -1) positions longer along its sequence axis ([B, S, ...] axis 1, or [S, ...] axis 0
    such as rotary tables): the last slice repeated, or dropped (only the shapes of the probe's outputs are read)."""
    shape = np.shape(value)
    axis = 1 if len(shape) >= 2 and shape[0] == batch and shape[1] == seq else (
        0 if len(shape) >= 1 and shape[0] == seq and (len(shape) == 1 or shape[0] != batch) else None)
    if axis is None:
        return value
    if step < 0:
        return np.take(value, range(seq - 1), axis=axis)
    return np.concatenate([value, np.take(value, [-1], axis=axis)], axis=axis)


def _probe_layouts(session: Any, feed: Feed, names: list[str], first: list[npt.NDArray[Any]],
                   options: CollectOptions) -> dict[str, TensorLayout]:
    """Token axes of every tensor from a second run one token shorter or longer (every sequence-shaped input
    resized)."""
    mask = feed.get(options.mask_input)
    ids = feed.get(options.ids_input)
    lead = mask if mask is not None and np.ndim(mask) == 2 else ids
    if lead is None or np.ndim(lead) != 2:
        logger.warning("no 2-D %r or %r input: token axes unknown, padding is not excluded from statistics",
                       options.ids_input, options.mask_input)
        return {n: TensorLayout() for n in names}
    if mask is None or np.ndim(mask) != 2:
        logger.warning("no 2-D %r input: padding cannot be excluded from statistics", options.mask_input)
    batch, seq = np.shape(lead)
    # one token shorter (a batch as long as the model's position table allows cannot grow), else one longer
    step = -1 if seq >= 2 else 1
    probe = {k: _resized(np.asarray(v), batch, seq, step) for k, v in feed.items()}
    try:
        other = session.run(names, dict(probe))
    except Exception as exc:  # a model with a fixed sequence length cannot be probed
        logger.warning("layout probe failed (%s); padding is not excluded from statistics", exc)
        return {n: TensorLayout() for n in names}
    shorter, longer = (first, other) if step > 0 else (other, first)
    base = seq if step > 0 else seq - 1
    shapes = {n: (tuple(a.shape), tuple(b.shape)) for n, a, b in zip(names, shorter, longer, strict=True)}
    merged = [n for n, (a, b) in shapes.items() if merged_batch_candidate(a, b, batch, base)]
    at_batch = _other_batch_shapes(session, probe if step < 0 else feed, names, batch) if merged else {}
    return {n: infer_layout(a, b, batch, base, at_batch.get(n)) for n, (a, b) in shapes.items()}


def _other_batch_shapes(session: Any, feed: Feed, names: list[str], batch: int) -> dict[str, tuple[tuple[int, ...],
                                                                                                    int]]:
    """Each tensor's shape, and the batch size, from ``feed`` cut to its first row (or doubled when it has one)."""
    other = 1 if batch > 1 else 2
    resized = {k: (np.asarray(v)[:1] if other == 1 else np.concatenate([v, v]))
               if np.ndim(v) >= 1 and np.shape(v)[0] == batch else np.asarray(v) for k, v in feed.items()}
    try:
        outputs = session.run(names, resized)
    except Exception as exc:  # a fixed batch size: merged axes stay unknown
        logger.warning("batch-size probe failed (%s); tensors that merge batch and heads keep their padding", exc)
        return {}
    return {n: (tuple(v.shape), other) for n, v in zip(names, outputs, strict=True)}


def _probe_small(session: Any, feed: Feed, names: list[str], options: CollectOptions) -> dict[str, TensorLayout] | None:
    """The layout probe on the first two rows of the batch (two short runs instead of a whole batch one token
    longer: the first batch is the longest); None when the batch is that small already or the model refuses."""
    lead = feed.get(options.mask_input, feed.get(options.ids_input))
    if lead is None or np.ndim(lead) != 2 or np.shape(lead)[0] <= 2:
        return None
    batch = np.shape(lead)[0]
    small = {k: np.asarray(v)[:2] if np.ndim(v) >= 2 and np.shape(v)[0] == batch else v for k, v in feed.items()}
    try:
        first = session.run(names, dict(small))
    except Exception:  # a fixed batch size: probe the whole batch
        return None
    return _probe_layouts(session, small, names, first, options)


def _new_stats(names: Sequence[str], layouts: Mapping[str, TensorLayout], has_ids: bool,
               options: CollectOptions) -> dict[str, TensorStatistics]:
    stats = {}
    for name in names:
        layout = layouts[name]
        kinds = [k for k in (*options.kinds, *options.extra_kinds.get(name, ()))
                 if not (k == "dims" and not layout.has_dims)
                 and not (k == "tokens" and not (has_ids and layout.has_dims and len(layout.token_axes) == 1))]
        stats[name] = TensorStatistics.create(name, kinds, bins=options.bins,
                                              allow_mask_values=options.allow_mask_values)
    return stats


def _resume(options: CollectOptions, model_sha: str, names: tuple[str, ...]) -> Statistics | None:
    path = options.checkpoint
    if path is None or not path.is_file():
        return None
    restored = Statistics.load(path)
    meta = restored.meta
    expected = (BatchRange(start=options.batch_offset, stop=options.batch_offset + meta.num_batches),)
    mismatch = [what for what, ok in (("model", meta.model_sha256 == model_sha), ("tensors", meta.tensors == names),
                                      ("options", meta.options == options.fingerprint()),
                                      ("batches", meta.batches in (expected, ()))) if not ok]
    if mismatch:
        raise CalibrationError(f"calibration state {path} was collected with a different {' and '.join(mismatch)}; "
                               "run again with --fresh to start over (or choose another output folder)")
    logger.info("resuming from %s after %d batches (%d samples)", path, meta.num_batches, meta.samples)
    return restored


@dataclass
class _Run:
    """Mutable progress of one collection pass."""

    names: tuple[str, ...]
    model_sha: str
    options: CollectOptions
    stats: dict[str, TensorStatistics] = field(default_factory=dict)
    layouts: dict[str, TensorLayout] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    digest: str = ""  # order-free digest of the folded batches
    resumed: int = 0
    consistent: bool = True  # False while a batch is half folded into the observers (never checkpointed)
    folder: Folder = field(default_factory=lambda: Folder(1))

    def statistics(self, complete: bool) -> Statistics:
        start = self.options.batch_offset
        meta = StatisticsMeta(
            model_sha256=self.model_sha, tensors=self.names,
            kinds={name: tuple(self.stats[name].observers) for name in self.names} if self.stats else {},
            options=self.options.fingerprint(), layouts=self.layouts,
            batches=(BatchRange(start=start, stop=start + self.batches),) if self.batches else (),
            samples=self.samples, data_digest=self.digest or combine_digests("", 0),
            data_source=self.options.data_source, complete=complete)
        return Statistics(meta=meta, tensors=self.stats)


def load_model_bytes(model: onnx.ModelProto | Path) -> tuple[bytes, str]:
    """The serialized model a collector runs (external data inlined) and the SHA-256 its Statistics record.

    What a distributed shard is sent: :func:`collect_serialized` on these gives the Statistics that
    :func:`collect` gives on ``model``.
    """
    _, data, sha = _load_model(model)
    return data, sha


def _session(proto: onnx.ModelProto, model_bytes: bytes, names: tuple[str, ...], opts: CollectOptions) -> Any:
    """An ONNX Runtime session exposing ``names`` as outputs."""
    import onnxruntime as ort

    instrumented = instrument(proto, model_bytes, names)
    session_options = ort.SessionOptions()
    if opts.threads:
        session_options.intra_op_num_threads = opts.threads
    # idle intra-op threads would spin for the next operator and take the cores the fold threads need
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session_options.log_severity_level = 4  # run failures surface as exceptions (calib.outputs), not log lines
    session = ort.InferenceSession(instrumented, session_options, providers=["CPUExecutionProvider"])
    check_float_outputs(session, names)
    return session


def _fold_batch(run: _Run, session: Any, feed: Feed, outputs: list[npt.NDArray[Any]], opts: CollectOptions) -> None:
    """Fold one batch's outputs into the observers (the first batch also probes the layouts)."""
    graph_inputs = {i.name for i in session.get_inputs()}
    run_names = [n for n in run.names if n not in graph_inputs]
    if not run.layouts:
        run.layouts = _probe_small(session, feed, run_names, opts) or _probe_layouts(session, feed, run_names,
                                                                                   outputs, opts)
        run.layouts.update({n: TensorLayout() for n in run.names if n not in run.layouts})
        run.stats = _new_stats(run.names, run.layouts, opts.ids_input in feed, opts)
    mask = feed.get(opts.mask_input)
    ids = feed.get(opts.ids_input)
    batch = opts.batch_offset + run.batches  # global index: first-token sample ids stay unique across shards
    run.folder.fold(run.stats, run.layouts, run_names, outputs, batch=batch,
                    mask=None if mask is None or np.ndim(mask) != 2 else np.asarray(mask).astype(bool),
                    ids=None if ids is None else np.asarray(ids))
    for name in run.names:
        if name in graph_inputs:
            rows, _ = valid_rows(np.asarray(feed[name], dtype=np.float32), run.layouts[name], None)
            run.stats[name].update(rows, batch=batch)
    run.batches += 1
    run.samples += int(next(iter(feed.values())).shape[0]) if feed else 0


@dataclass
class _Pending:
    """A batch whose inference runs in the background while the previous batch is folded."""

    future: Future[list[npt.NDArray[Any]]]
    feed: Feed
    digest: int  # digest of this batch, added once it is folded


def _finish(run: _Run, session: Any, pending: _Pending, opts: CollectOptions) -> None:
    _fold_batch(run, session, pending.feed, pending.future.result(), opts)
    run.digest = combine_digests(run.digest, pending.digest)
    if opts.progress is not None:
        opts.progress(run.batches, run.samples)
    if opts.checkpoint is not None and run.batches % opts.checkpoint_every == 0:
        run.statistics(complete=False).save(opts.checkpoint)


def _salvage(run: _Run, session: Any, pending: _Pending, opts: CollectOptions) -> None:
    """On an interrupt between batches, fold the batch already running (its inference is not wasted)."""
    try:
        outputs = pending.future.result()
    except Exception:  # the in-flight inference failed too: keep the last consistent state
        return
    run.consistent = False
    _fold_batch(run, session, pending.feed, outputs, opts)
    run.digest = combine_digests(run.digest, pending.digest)
    run.consistent = True


def _stream(run: _Run, session: Any, feeds: Iterable[Feed], opts: CollectOptions, restored: Statistics | None) -> None:
    """Run and fold every batch; batch k+1's inference overlaps folding batch k (two batches in memory)."""
    skip = restored.meta.num_batches if restored else 0
    graph_inputs = {i.name for i in session.get_inputs()}
    run_names = [n for n in run.names if n not in graph_inputs]
    read_digest = ""
    pending: _Pending | None = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            for index, feed in enumerate(feeds):
                validate_feed(session, feed, index)
                digest = batch_digest(opts.batch_offset + index, feed)
                if index < skip:
                    read_digest = combine_digests(read_digest, digest)
                    if index == skip - 1:
                        _restore(run, restored, read_digest)
                    continue
                started = _Pending(pool.submit(run_unbound, session, run_names, feed), feed, digest)
                if pending is not None:
                    run.consistent = False
                    _finish(run, session, pending, opts)
                    run.consistent = True
                pending = started
            if pending is not None:
                run.consistent = False
                _finish(run, session, pending, opts)
                run.consistent = True
                pending = None
        except BaseException:
            if pending is not None and run.consistent:
                _salvage(run, session, pending, opts)
            if opts.checkpoint is not None and run.consistent and run.batches > run.resumed and run.stats:
                run.statistics(complete=False).save(opts.checkpoint)
                logger.warning("interrupted after %d batches; calibration state saved to %s", run.batches,
                               opts.checkpoint)
            raise


def collect(model: onnx.ModelProto | Path, feeds: Iterable[Feed], tensors: Sequence[str],
            options: CollectOptions | None = None) -> CollectResult:
    """Run the model over ``feeds`` and fold every tensor of ``tensors`` into its observers.

    Raises CalibrationError for empty data, feeds that do not match the model inputs, NaN/+inf activations
    and a checkpoint collected from something else. A complete checkpoint of the same model, tensors,
    options and data is reused without running the model (every batch is still read and its digest checked).
    """
    proto, model_bytes, model_sha = _load_model(model)
    return _collect(proto, model_bytes, model_sha, feeds, tensors, options or CollectOptions())


def collect_serialized(model_bytes: bytes, model_sha256: str, feeds: Iterable[Feed], tensors: Sequence[str],
                       options: CollectOptions | None = None) -> CollectResult:
    """:func:`collect` on a model received as bytes (:func:`load_model_bytes`), e.g. by a distributed shard."""
    try:
        proto = onnx.load_from_string(model_bytes)
    except Exception as exc:  # onnx raises DecodeError and others
        raise CalibrationError(f"cannot read the serialized ONNX model: {exc}") from exc
    return _collect(proto, model_bytes, model_sha256, feeds, tensors, options or CollectOptions())


def _collect(proto: onnx.ModelProto, model_bytes: bytes, model_sha: str, feeds: Iterable[Feed],
             tensors: Sequence[str], opts: CollectOptions) -> CollectResult:
    names = tuple(dict.fromkeys(tensors))
    if FUSED:
        fused.warm_up()  # loads the compiled kernels while the session is built
    session = _session(proto, model_bytes, names, opts)
    run = _Run(names=names, model_sha=model_sha, options=opts, folder=Folder(opts.fold_thread_count))
    restored = _resume(opts, model_sha, names)
    started = time.perf_counter()
    try:
        _stream(run, session, feeds, opts, restored)
    finally:
        run.folder.close()
    skip = restored.meta.num_batches if restored else 0
    if skip and run.batches < skip:
        raise CalibrationError(f"the calibration data ended after {run.batches} batches, before the "
                               f"{skip} batches of the saved state {opts.checkpoint}; run again with --fresh")
    if run.batches == 0:
        raise CalibrationError("calibration data is empty: no batches were given")
    statistics = run.statistics(complete=True)
    if opts.checkpoint is not None:
        statistics.save(opts.checkpoint)
    logger.info("collected %d tensors over %d batches (%d samples, %d resumed) in %.1f s", len(names),
                run.batches, run.samples, run.resumed, time.perf_counter() - started)
    return CollectResult(statistics=statistics, resumed_batches=run.resumed)


def _restore(run: _Run, restored: Statistics | None, digest: str) -> None:
    """Adopt the saved state once the skipped batches are verified to be the same data."""
    assert restored is not None
    if restored.meta.data_digest != digest:
        raise CalibrationError("the calibration data differs from the data the saved state was collected on; "
                               "run again with --fresh to start over")
    run.stats, run.layouts, run.digest = restored.tensors, dict(restored.meta.layouts), digest
    run.batches = run.resumed = restored.meta.num_batches
    run.samples = restored.meta.samples
