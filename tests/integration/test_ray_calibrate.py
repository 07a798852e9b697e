"""Sharded calibration: in-process shards and Ray tasks (``ray.init`` with two CPUs, in a loopback-only network
namespace so Ray uses 127.0.0.1 only) give the bytes of one single-process run; finished shards are reused
(in-process here; through Ray in the slow cluster test, tests/integration/test_ray_cluster.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder.cli.main import main
from builder.distributed.ray_calibrate import ShardConfig, collect_sharded, shard_path, shard_ranges
from calib.collect import CollectOptions, collect
from calib.errors import ConfigError
from calib.statistics import BatchRange
from tests.loopback import LoopbackNamespace
from tests.toygraphs import bert_block_model

VIEWS = ("statistics.npz", "ranges.json", "calibration.cache")


def _calibrate(model: Path, out: Path, *extra: str) -> dict[str, bytes]:
    code = main(["calibrate", str(model), "--samples", "64", "--batch-size", "16", "--method", "entropy",
                 "--no-progress", "-o", str(out), *extra])
    assert code == 0
    return {name: (out / name).read_bytes() for name in VIEWS}


@pytest.fixture(scope="module")
def single_process(minilm_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return _calibrate(minilm_onnx, tmp_path_factory.mktemp("single"))


def _toy_feeds(batches: int) -> list[dict[str, np.ndarray]]:
    """Token ids and right-padded masks for the toy BERT block (the collector's tests build them alike)."""
    rng = np.random.default_rng(7)
    feeds = []
    for _ in range(batches):
        lengths = rng.integers(3, 10, size=4)
        ids = np.zeros((4, int(lengths.max())), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, n in enumerate(lengths):
            ids[row, :n] = rng.integers(1000, 2000, size=n)
            mask[row, :n] = 1
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds


def test_shard_ranges_cover_every_batch_once() -> None:
    ranges = shard_ranges(10, 4)
    assert [(r.start, r.stop) for r in ranges] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert shard_ranges(3, 8) == tuple(BatchRange(start=i, stop=i + 1) for i in range(3))
    with pytest.raises(ConfigError, match="shards"):
        ShardConfig(shards=0)


def test_in_process_shards_merge_into_the_one_pass_and_are_reused(tmp_path: Path) -> None:
    model = bert_block_model(layers=2, hidden=32, heads=2, ffn=64)
    tensors = [o for n in model.graph.node if n.op_type in ("MatMul", "Softmax", "LayerNormalization")
               for o in n.output]
    feeds = _toy_feeds(7)
    options = CollectOptions(bins=256, data_source="toy")
    one = collect(model, feeds, tensors, options).statistics
    sharded = collect_sharded(model, feeds, tensors, options, tmp_path, ShardConfig(shards=3))
    assert sharded.statistics.state_bytes() == one.state_bytes() and sharded.reused_shards == 0
    middle = shard_path(tmp_path, shard_ranges(7, 3)[1])
    middle.unlink()  # an interrupted run: one shard never finished
    again = collect_sharded(model, feeds, tensors, options, tmp_path, ShardConfig(shards=3))
    assert again.reused_shards == 2 and again.reused_batches == 7 - 2  # every batch but the middle shard's two
    assert again.statistics.state_bytes() == one.state_bytes() and middle.is_file()
    changed = [dict(f) for f in feeds]
    changed[0] = {k: v.copy() for k, v in feeds[0].items()}
    changed[0]["input_ids"][0, 0] += 1  # other data: the first shard's digest no longer matches
    redone = collect_sharded(model, changed, tensors, options, tmp_path, ShardConfig(shards=3))
    assert redone.reused_shards == 2 and redone.statistics.state_bytes() == collect(
        model, changed, tensors, options).statistics.state_bytes()


def test_ray_shards_give_the_single_process_bytes(minilm_onnx: Path, single_process: dict[str, bytes],
                                                  tmp_path: Path) -> None:
    pytest.importorskip("ray")
    command = ["-m", "tests.ray_driver", "2", "--", "calibrate", str(minilm_onnx), "--samples", "64",
               "--batch-size", "16", "--method", "entropy", "--no-progress", "-o", str(tmp_path), "--ray", "auto",
               "--shards", "4"]
    with LoopbackNamespace() as namespace:
        run = namespace.run_python(command)
    assert run.returncode == 0, run.stderr[-2000:]
    assert {name: (tmp_path / name).read_bytes() for name in VIEWS} == single_process  # byte for byte
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "00000-00001.npz", "00001-00002.npz", "00002-00003.npz", "00003-00004.npz"]


def test_a_bad_ray_address_is_a_usage_error(minilm_onnx: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(minilm_onnx), "--samples", "16", "--ray", "nowhere", "-o", str(tmp_path)]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert not (tmp_path / "statistics.npz").exists()


def test_an_address_where_no_ray_listens_fails_fast(minilm_onnx: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A HOST:PORT nothing listens on is reported at once (ray.init would retry it for minutes)."""
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = main(["calibrate", str(minilm_onnx), "--samples", "16", "--no-progress", "--ray", f"127.0.0.1:{port}",
                 "-o", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    # the connection check's message (Ray's own failure, after minutes of retries, reads "cannot connect")
    assert f"cannot reach Ray at '127.0.0.1:{port}'" in err and "ray start --head" in err
    assert not (tmp_path / "statistics.npz").exists()


@pytest.mark.slow
def test_ray_local_connects_once_for_the_shard_count_and_the_shards(minilm_onnx: Path,
                                                                     single_process: dict[str, bytes],
                                                                     tmp_path: Path) -> None:
    """``--ray local`` without ``--shards``: one private Ray sizes the shards and runs them (it used to start two)."""
    pytest.importorskip("ray")
    command = ["-m", "builder.cli.main", "-v", "calibrate", str(minilm_onnx), "--samples", "64", "--batch-size",
               "16", "--method", "entropy", "--no-progress", "-o", str(tmp_path), "--ray", "local"]
    with LoopbackNamespace() as namespace:
        run = namespace.run_python(command)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.count("connected to Ray at local") == 1, run.stderr[-2000:]
    assert {name: (tmp_path / name).read_bytes() for name in VIEWS} == single_process
