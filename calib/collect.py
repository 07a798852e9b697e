"""Calibration stage: the collector (ONNX Runtime with intermediate tensors exposed -> observers).

One ONNX Runtime session runs a copy of the model whose graph outputs include every requested tensor.
Batches stream through: each batch's activations are folded into the observers and dropped, so memory is
bounded by one batch. Padding is excluded using the attention mask and token axes found by a probe run
(calib.layout). Observer states are checkpointed every few batches (atomic write); a run given the same
checkpoint resumes after the last saved batch, after checking that the model, the tensors, the options and
the data consumed so far are the same.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from calib.artifact_io import sha256_file
from calib.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from calib.errors import CalibrationError, ConfigError, suggest
from calib.histogram import DEFAULT_NUM_BINS
from calib.layout import TensorLayout, infer_layout, valid_rows
from calib.tensor_stats import TensorStats

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

    num_bins: int = DEFAULT_NUM_BINS  # initial histogram bins (TensorRT: 2048)
    per_token: bool = True  # per-token-id statistics for [batch, seq, dim] tensors
    allow_mask_values: bool = True  # exclude -inf / <= -1e30 attention-mask sentinels instead of failing
    mask_input: str = "attention_mask"
    ids_input: str = "input_ids"
    checkpoint: Path | None = None  # observer-state checkpoint for resuming an interrupted run
    checkpoint_every: int = 4  # batches between checkpoint writes
    threads: int = 0  # ONNX Runtime intra-op threads (0: its default)
    data_source: str = "feeds"  # recorded in the RangeTable (e.g. "vader:movie")
    progress: Progress | None = field(default=None, compare=False)  # called with (batches, samples) per batch

    def __post_init__(self) -> None:
        if self.num_bins < 128:
            raise ConfigError(f"num_bins {self.num_bins} must be at least 128 (entropy needs 128 levels)")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every {self.checkpoint_every} must be at least 1")

    def fingerprint(self) -> dict[str, Any]:
        return {"num_bins": self.num_bins, "per_token": self.per_token, "allow_mask_values": self.allow_mask_values,
                "mask_input": self.mask_input, "ids_input": self.ids_input}


@dataclass
class Collection:
    """The result of a collection pass: observer states per tensor, ready for any range method."""

    model_sha256: str
    tensors: tuple[str, ...]
    stats: dict[str, TensorStats]
    layouts: dict[str, TensorLayout] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    resumed_batches: int = 0  # batches restored from a checkpoint instead of being run
    data_sha256: str = ""


def _load_model(model: onnx.ModelProto | Path) -> tuple[onnx.ModelProto, bytes, str]:
    """The model, its serialized bytes and their SHA-256 (the file's hash for a path)."""
    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
        return model, data, hashlib.sha256(data).hexdigest()
    path = Path(model)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        if any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer):
            proto = onnx.load(str(path))
            data = proto.SerializeToString()
        else:
            data = path.read_bytes()
    except Exception as exc:  # onnx raises DecodeError and others
        raise CalibrationError(f"cannot read ONNX model {path}: {exc}") from exc
    return proto, data, sha256_file(path)


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
            f"Expected inputs: {_describe_inputs(session)}"
        )


def _batch_digest(previous: str, feed: Feed) -> str:
    digest = hashlib.sha256(previous.encode())
    for name in sorted(feed):
        arr = np.ascontiguousarray(feed[name])
        digest.update(f"{name}|{arr.dtype.str}|{arr.shape}".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def _probe_layouts(session: Any, feed: Feed, names: list[str], first: list[npt.NDArray[Any]],
                   options: CollectOptions) -> dict[str, TensorLayout]:
    """Token axes of every tensor from a second run with one extra padding column."""
    mask = feed.get(options.mask_input)
    if mask is None or np.ndim(mask) != 2:
        logger.warning("no 2-D %r input: padding cannot be excluded from statistics", options.mask_input)
        return {n: TensorLayout() for n in names}
    batch, seq = mask.shape
    probe = {k: (np.concatenate([v, np.zeros((batch, 1), dtype=v.dtype)], axis=1) if np.shape(v) == mask.shape
                 else v) for k, v in feed.items()}
    try:
        longer = session.run(names, dict(probe))
    except Exception as exc:  # a model with a fixed sequence length cannot be probed
        logger.warning("layout probe failed (%s); padding is not excluded from statistics", exc)
        return {n: TensorLayout() for n in names}
    return {n: infer_layout(tuple(a.shape), tuple(b.shape), batch, seq) for n, a, b in zip(names, first, longer,
                                                                                            strict=True)}


def _new_stats(names: Sequence[str], layouts: Mapping[str, TensorLayout], has_ids: bool,
               options: CollectOptions) -> dict[str, TensorStats]:
    stats = {}
    for name in names:
        layout = layouts[name]
        per_token = options.per_token and has_ids and layout.has_dims and len(layout.token_axes) == 1
        stats[name] = TensorStats.create(name, num_bins=options.num_bins, per_dim=layout.has_dims,
                                         per_token=per_token, allow_mask_values=options.allow_mask_values)
    return stats


def _resume(options: CollectOptions, model_sha: str, names: tuple[str, ...]
            ) -> tuple[CheckpointMeta, dict[str, TensorStats]] | None:
    path = options.checkpoint
    if path is None or not path.is_file():
        return None
    meta, stats = load_checkpoint(path)
    mismatch = [what for what, ok in (("model", meta.model_sha256 == model_sha), ("tensors", meta.tensors == names),
                                      ("options", dict(meta.options) == options.fingerprint())) if not ok]
    if mismatch:
        raise CalibrationError(f"checkpoint {path} was collected with a different {' and '.join(mismatch)}; "
                               "delete it or choose another checkpoint path to start over")
    logger.info("resuming from %s after %d batches (%d samples)", path, meta.batches, meta.samples)
    return meta, stats


@dataclass
class _Run:
    """Mutable progress of one collection pass."""

    names: tuple[str, ...]
    model_sha: str
    stats: dict[str, TensorStats] = field(default_factory=dict)
    layouts: dict[str, TensorLayout] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    digest: str = ""  # chained digest of the folded batches
    resumed: int = 0
    consistent: bool = True  # False while a batch is half folded into the observers (never checkpointed)

    def meta(self, options: CollectOptions, complete: bool) -> CheckpointMeta:
        return CheckpointMeta(model_sha256=self.model_sha, tensors=self.names, options=options.fingerprint(),
                              batches=self.batches, samples=self.samples, data_sha256=self.digest,
                              layouts=self.layouts, complete=complete)


def _observe(run: _Run, names: list[str], outputs: list[npt.NDArray[Any]], feed: Feed,
             options: CollectOptions) -> None:
    mask = feed.get(options.mask_input)
    mask_b = None if mask is None or np.ndim(mask) != 2 else np.asarray(mask).astype(bool)
    ids = feed.get(options.ids_input)
    for name, value in zip(names, outputs, strict=True):
        stats = run.stats[name]
        rows, row_ids = valid_rows(np.asarray(value, dtype=np.float32), run.layouts[name], mask_b,
                                   None if stats.tokens is None or ids is None else np.asarray(ids))
        stats.update(rows, row_ids, batch=run.batches)


def _session(model: onnx.ModelProto | Path, names: tuple[str, ...], opts: CollectOptions) -> tuple[Any, str]:
    """An ONNX Runtime session exposing ``names`` as outputs, and the model's hash."""
    import onnxruntime as ort

    proto, model_bytes, model_sha = _load_model(model)
    instrumented = instrument(proto, model_bytes, names)
    session_options = ort.SessionOptions()
    if opts.threads:
        session_options.intra_op_num_threads = opts.threads
    session = ort.InferenceSession(instrumented, session_options, providers=["CPUExecutionProvider"])
    check_float_outputs(session, names)
    return session, model_sha


def _fold_batch(run: _Run, session: Any, feed: Feed, outputs: list[npt.NDArray[Any]], opts: CollectOptions) -> None:
    """Fold one batch's outputs into the observers (the first batch also probes the layouts)."""
    graph_inputs = {i.name for i in session.get_inputs()}
    run_names = [n for n in run.names if n not in graph_inputs]
    if not run.layouts:
        run.layouts = _probe_layouts(session, feed, run_names, outputs, opts)
        run.layouts.update({n: TensorLayout() for n in run.names if n not in run.layouts})
        run.stats = _new_stats(run.names, run.layouts, opts.ids_input in feed, opts)
    _observe(run, run_names, outputs, feed, opts)
    for name in run.names:
        if name in graph_inputs:
            rows, _ = valid_rows(np.asarray(feed[name], dtype=np.float32), run.layouts[name], None)
            run.stats[name].update(rows, batch=run.batches)
    run.batches += 1
    run.samples += int(next(iter(feed.values())).shape[0]) if feed else 0


@dataclass
class _Pending:
    """A batch whose inference runs in the background while the previous batch is folded."""

    future: Future[list[npt.NDArray[Any]]]
    feed: Feed
    digest: str  # data digest once this batch is folded


def _finish(run: _Run, session: Any, pending: _Pending, opts: CollectOptions) -> None:
    _fold_batch(run, session, pending.feed, pending.future.result(), opts)
    run.digest = pending.digest
    if opts.progress is not None:
        opts.progress(run.batches, run.samples)
    if opts.checkpoint is not None and run.batches % opts.checkpoint_every == 0:
        save_checkpoint(opts.checkpoint, run.meta(opts, complete=False), run.stats)


def _salvage(run: _Run, session: Any, pending: _Pending, opts: CollectOptions) -> None:
    """On an interrupt between batches, fold the batch already running (its inference is not wasted)."""
    try:
        outputs = pending.future.result()
    except Exception:  # the in-flight inference failed too: keep the last consistent state
        return
    run.consistent = False
    _fold_batch(run, session, pending.feed, outputs, opts)
    run.digest = pending.digest
    run.consistent = True


def _stream(run: _Run, session: Any, feeds: Iterable[Feed], opts: CollectOptions,
            restored: tuple[CheckpointMeta, dict[str, TensorStats]] | None) -> None:
    """Run and fold every batch; batch k+1's inference overlaps folding batch k (two batches in memory)."""
    skip = restored[0].batches if restored else 0
    run_names = [n for n in run.names if n not in {i.name for i in session.get_inputs()}]
    read_digest = ""
    pending: _Pending | None = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            for index, feed in enumerate(feeds):
                validate_feed(session, feed, index)
                read_digest = _batch_digest(read_digest, feed)
                if index < skip:
                    run.digest = read_digest
                    if index == skip - 1:
                        _restore(run, restored, read_digest)
                    continue
                started = _Pending(pool.submit(session.run, run_names, dict(feed)), feed, read_digest)
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
                save_checkpoint(opts.checkpoint, run.meta(opts, complete=False), run.stats)
                logger.warning("interrupted after %d batches; checkpoint saved to %s", run.batches, opts.checkpoint)
            raise


def collect(model: onnx.ModelProto | Path, feeds: Iterable[Feed], tensors: Sequence[str],
            options: CollectOptions | None = None) -> Collection:
    """Run the model over ``feeds`` and fold every tensor of ``tensors`` into its observers.

    Raises CalibrationError for empty data, feeds that do not match the model inputs, NaN/+inf activations
    and a checkpoint collected from something else.
    """
    opts = options or CollectOptions()
    names = tuple(dict.fromkeys(tensors))
    session, model_sha = _session(model, names, opts)
    run = _Run(names=names, model_sha=model_sha)
    restored = _resume(opts, model_sha, names)
    started = time.perf_counter()
    _stream(run, session, feeds, opts, restored)
    skip = restored[0].batches if restored else 0
    if skip and run.batches < skip:
        raise CalibrationError(f"the calibration data ended after {run.batches} batches, before the "
                               f"{skip} batches of checkpoint {opts.checkpoint}; delete it to start over")
    if run.batches == 0:
        raise CalibrationError("calibration data is empty: no batches were given")
    if opts.checkpoint is not None:
        save_checkpoint(opts.checkpoint, run.meta(opts, complete=True), run.stats)
    logger.info("collected %d tensors over %d batches (%d samples, %d resumed) in %.1f s", len(names),
                run.batches, run.samples, run.resumed, time.perf_counter() - started)
    return Collection(model_sha256=model_sha, tensors=names, stats=run.stats, layouts=run.layouts,
                      batches=run.batches, samples=run.samples, resumed_batches=run.resumed, data_sha256=run.digest)


def _restore(run: _Run, restored: tuple[CheckpointMeta, dict[str, TensorStats]] | None, digest: str) -> None:
    """Adopt the checkpoint once the skipped batches are verified to be the same data."""
    assert restored is not None
    meta, stats = restored
    if meta.data_sha256 != digest:
        raise CalibrationError("the calibration data differs from the data the checkpoint was collected on; "
                               "delete the checkpoint to start over")
    run.stats, run.layouts = stats, dict(meta.layouts)
    run.batches = run.resumed = meta.batches
    run.samples = meta.samples
