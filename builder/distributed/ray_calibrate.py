"""Scale-out stage: calibration sharded over Ray tasks, reduced by exact Statistics merges.

The calibration batches are cut into contiguous shards; each shard is collected by one task (the same
collector as a single-process run, told the global index of its first batch) into Statistics, and the
driver merges them in batch order. Observer states merge exactly (calib.statistics), so the merged
Statistics, ``statistics.npz``, ``ranges.json`` and ``calibration.cache`` are byte-identical to one pass:

    batches  0 1 2 3 | 4 5 6 7 | 8 9 10 11 | 12 13 14 15      shard k: batches [start_k, stop_k)
             task 0    task 1    task 2      task 3           Ray retries a task whose worker died
             shards/00000-00004.npz ...                        written by the driver as each task ends
             merge(0, 1, 2, 3) == collect(0 .. 15), bit for bit

Each finished shard is kept in ``<folder>/shards/`` and reused by a later run when its model, tensors,
options, batch range and data digest match, so an interrupted run redoes only the unfinished shards.
Tasks receive the serialized model once (the object store) and their shard's feeds; they write nothing, so
workers need no shared file system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from calib.artifact_io import atomic_write_bytes
from calib.errors import CalibrationError, ConfigError

if TYPE_CHECKING:
    import onnx

    from builder.cli.steps import CalibSettings
    from calib.collect import CollectOptions, CollectResult, Feed
    from calib.statistics import BatchRange, Statistics
    from calib.text_encoder import TextEncoder

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"
DEFAULT_RETRIES = 3  # Ray re-runs a task this often when its worker process or node dies


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """How the shards run: how many, on which cluster, with how many threads each."""

    shards: int | None = None  # None: one per CPU of the cluster (at most one per batch)
    address: str | None = None  # None: in-process, one shard after the other; else a ``--ray`` address
    cpus_per_shard: int = 1  # Ray CPUs per task = ONNX Runtime threads = fold threads
    retries: int = DEFAULT_RETRIES
    local_cpus: int | None = None  # CPUs of a ``local`` Ray instance (None: every core)

    def __post_init__(self) -> None:
        if self.shards is not None and self.shards < 1:
            raise ConfigError(f"--shards {self.shards} must be at least 1")
        if self.cpus_per_shard < 1 or self.retries < 0:
            raise ConfigError(f"cpus per shard {self.cpus_per_shard} must be >= 1 and retries {self.retries} >= 0")
        if self.address is not None:
            from builder.distributed.cluster import check_address

            check_address(self.address)


@dataclass(frozen=True, kw_only=True)
class ShardedResult:
    """A sharded collection: the merged Statistics and what it cost."""

    statistics: Statistics
    shards: int
    reused_shards: int
    reused_batches: int
    collect_s: float  # wall time until every shard was in
    merge_s: float  # the exact reduction of the shards


def shard_ranges(num_batches: int, shards: int) -> tuple[BatchRange, ...]:
    """``shards`` contiguous batch ranges covering [0, num_batches), sizes differing by at most one."""
    from calib.statistics import BatchRange

    if num_batches < 1:
        raise CalibrationError("calibration data is empty: no batches were given")
    count = max(1, min(shards, num_batches))
    bounds = [num_batches * k // count for k in range(count + 1)]
    return tuple(BatchRange(start=a, stop=b) for a, b in itertools.pairwise(bounds))


def shard_path(folder: Path, shard: BatchRange) -> Path:
    return folder / SHARD_DIR / f"{shard.start:05d}-{shard.stop:05d}.npz"


def collect_shard(model_bytes: bytes, model_sha256: str, feeds: Sequence[Feed], tensors: Sequence[str],
                  options: CollectOptions) -> bytes:
    """One shard (the task body, the same in a Ray worker and in-process): its Statistics as ``.npz`` bytes."""
    from calib.collect import collect_serialized

    return collect_serialized(model_bytes, model_sha256, feeds, tensors, options).statistics.state_bytes()


def _expected_digest(feeds: Sequence[Feed], shard: BatchRange) -> str:
    from calib.statistics import batch_digest, combine_digests

    digest = ""
    for index in range(shard.start, shard.stop):
        digest = combine_digests(digest, batch_digest(index, feeds[index]))
    return digest


def _reusable(path: Path, shard: BatchRange, feeds: Sequence[Feed], model_sha: str, tensors: tuple[str, ...],
              options: CollectOptions) -> Statistics | None:
    """The saved Statistics at ``path`` when they are exactly this shard of this model, data and options."""
    from calib.statistics import BatchRange, Statistics

    if not path.is_file():
        return None
    try:
        saved = Statistics.load(path)
    except CalibrationError as exc:
        logger.warning("ignoring %s: %s", path, exc)
        return None
    meta = saved.meta
    if not (meta.complete and meta.model_sha256 == model_sha and meta.tensors == tensors
            and meta.options == options.fingerprint() and meta.data_source == options.data_source
            and meta.batches == (BatchRange(start=shard.start, stop=shard.stop),)
            and meta.data_digest == _expected_digest(feeds, shard)):
        logger.info("%s was collected from other inputs; collecting the shard again", path)
        return None
    return saved


def _shard_options(options: CollectOptions, shard: BatchRange, cpus: int) -> CollectOptions:
    return dataclasses.replace(options, batch_offset=shard.start, checkpoint=None, progress=None, threads=cpus,
                               fold_threads=cpus)


def _run_in_process(jobs: list[tuple[BatchRange, list[Feed]]], model: tuple[bytes, str], tensors: tuple[str, ...],
                    options: CollectOptions, config: ShardConfig, done: Callable[[BatchRange, bytes], None]) -> None:
    for shard, feeds in jobs:  # one at a time, each with every core (0: the collector's automatic threads)
        done(shard, collect_shard(*model, feeds, tensors, _shard_options(options, shard, 0)))


def _run_on_ray(ray: ModuleType, jobs: list[tuple[BatchRange, list[Feed]]], model: tuple[bytes, str],
                tensors: tuple[str, ...], options: CollectOptions, config: ShardConfig,
                done: Callable[[BatchRange, bytes], None]) -> None:
    task = ray.remote(collect_shard).options(num_cpus=config.cpus_per_shard, max_retries=config.retries)
    model_ref = ray.put(model[0])
    pending: dict[Any, BatchRange] = {}
    for shard, feeds in jobs:
        ref = task.remote(model_ref, model[1], feeds, tensors, _shard_options(options, shard, config.cpus_per_shard))
        pending[ref] = shard
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            shard = pending.pop(ref)
            try:
                data = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the collector raised: the user's error, unwrapped
                cause = exc.as_instanceof_cause()
                raise cause if isinstance(cause, CalibrationError | ConfigError) else CalibrationError(
                    f"calibration shard [{shard.start}, {shard.stop}) failed: {exc}") from exc
            done(shard, data)


class _Cluster:
    """The Ray session of one sharded run, connected on first use (a run whose shards are all saved and counted
    needs none) and left once, at the end."""

    def __init__(self, config: ShardConfig, stack: contextlib.ExitStack) -> None:
        self.config, self.stack = config, stack
        self.module: ModuleType | None = None

    def ray(self) -> ModuleType:
        from builder.distributed.cluster import ray_session

        if self.module is None:
            assert self.config.address is not None
            self.module = self.stack.enter_context(ray_session(self.config.address, num_cpus=self.config.local_cpus))
        return self.module


def default_shards(config: ShardConfig, cluster: _Cluster) -> int:
    """The shard count of ``config``: given, one in-process, or one per CPU of the cluster."""
    import os

    if config.shards is not None:
        return config.shards
    if config.address is None:
        return 1
    ray = cluster.ray()
    return max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)) // config.cpus_per_shard)


def collect_sharded(model: onnx.ModelProto | Path, feeds: Sequence[Feed], tensors: Sequence[str],
                    options: CollectOptions, folder: Path, config: ShardConfig, *,
                    progress: Callable[[int, int], None] | None = None) -> ShardedResult:
    """Collect ``feeds`` in shards (on Ray when ``config.address`` is set), keep each shard in
    ``folder/shards/`` and return the exact merge (equal to ``collect(model, feeds, tensors, options)``).

    ``progress`` is called with (shards done, shards) as shards finish.
    """
    with contextlib.ExitStack() as stack:  # one Ray session for the shard count and the shards
        return _collect_sharded(model, feeds, tensors, options, folder, config, _Cluster(config, stack), progress)


def _collect_sharded(model: onnx.ModelProto | Path, feeds: Sequence[Feed], tensors: Sequence[str],
                     options: CollectOptions, folder: Path, config: ShardConfig, cluster: _Cluster,
                     progress: Callable[[int, int], None] | None) -> ShardedResult:
    from calib.collect import load_model_bytes

    model_bytes, model_sha = load_model_bytes(model)
    names = tuple(dict.fromkeys(tensors))
    ranges = shard_ranges(len(feeds), default_shards(config, cluster))
    started = time.perf_counter()
    parts: dict[int, Statistics] = {}
    for shard in ranges:
        saved = _reusable(shard_path(folder, shard), shard, feeds, model_sha, names, options)
        if saved is not None:
            parts[shard.start] = saved
    reused = len(parts)
    reused_batches = sum(s.stop - s.start for s in ranges if s.start in parts)
    jobs = [(s, list(feeds[s.start:s.stop])) for s in ranges if s.start not in parts]
    if reused:
        logger.info("reusing %d of %d finished shards from %s", reused, len(ranges), folder / SHARD_DIR)

    def done(shard: BatchRange, data: bytes) -> None:
        from calib.statistics import Statistics

        path = shard_path(folder, shard)
        atomic_write_bytes(path, data)
        parts[shard.start] = Statistics.load(path)
        if progress is not None:
            progress(len(parts), len(ranges))

    if jobs and config.address is not None:
        _run_on_ray(cluster.ray(), jobs, (model_bytes, model_sha), names, options, config, done)
    elif jobs:
        _run_in_process(jobs, (model_bytes, model_sha), names, options, config, done)
    collected = time.perf_counter() - started
    statistics = merge_in_order([parts[s.start] for s in ranges])
    merge_s = time.perf_counter() - started - collected
    return ShardedResult(statistics=statistics, shards=len(ranges), reused_shards=reused,
                         reused_batches=reused_batches, collect_s=collected, merge_s=merge_s)


def merge_in_order(parts: Sequence[Statistics]) -> Statistics:
    """The exact merge of shard Statistics (the first one is folded into; the order does not change a bit)."""
    if not parts:
        raise CalibrationError("no calibration shards to merge")
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    return merged


def calibrate_sharded(model: onnx.ModelProto | Path, tensors: Sequence[str], settings: CalibSettings,
                      folder: Path, encoder: TextEncoder, config: ShardConfig, *, fresh: bool = False,
                      progress: bool = True) -> CollectResult:
    """``build-engine calibrate --ray``: what builder.cli.steps.collect_statistics does, sharded.

    Writes ``folder/statistics.npz`` (the merged Statistics, the same bytes as a single-process run) and
    keeps the shards in ``folder/shards/``; ``fresh`` deletes both first.
    """
    from builder.cli.steps import STATE_FILE, calibration_feeds
    from calib.collect import CollectOptions, CollectResult

    feeds = calibration_feeds(settings, encoder)
    if fresh:
        (folder / STATE_FILE).unlink(missing_ok=True)
        for old in (folder / SHARD_DIR).glob("*.npz"):
            old.unlink()
    inputs = encoder.inputs
    options = CollectOptions(bins=settings.bins, data_source=settings.source,
                             mask_input=inputs.mask or "attention_mask", ids_input=inputs.tokens)

    def report(done: int, total: int) -> None:
        if progress:
            print(f"calibration shard {done}/{total} done", flush=True)

    result = collect_sharded(model, feeds, tensors, options, folder, config, progress=report)
    result.statistics.save(folder / STATE_FILE)
    logger.info("%d shards (%d reused) collected in %.1f s, merged in %.3f s", result.shards, result.reused_shards,
                result.collect_s, result.merge_s)
    return CollectResult(statistics=result.statistics, resumed_batches=result.reused_batches)
