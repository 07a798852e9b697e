"""trtexec-style latency statistics; the LatencyReport round trip, its JSON shape and strict decoding."""

from __future__ import annotations

import json
import math

import pytest

from builder.profile.report import (
    LatencyReport,
    LatencyResult,
    LatencyStats,
    trtexec_median,
    trtexec_percentile,
)
from calib.errors import ConfigError


def test_percentiles_pick_trtexec_samples() -> None:
    # 1..100 ms: trtexec excludes floor((1 - p/100) * n) samples from the top, computed in float32,
    # where (1 - 0.99f) * 100 = 0.99999905 excludes nothing and (1 - 0.9f) * 100 = 10.0000024 excludes 10
    samples = [float(v) for v in range(1, 101)]
    assert trtexec_percentile(samples, 99.0) == 100.0
    assert trtexec_percentile(samples, 95.0) == 95.0
    assert trtexec_percentile(samples, 90.0) == 90.0
    # 50 samples: p99 excludes int(0.5) = 0 samples -> the maximum; p90 excludes 5 -> the 45th value
    fifty = [float(v) for v in range(1, 51)]
    assert trtexec_percentile(fifty, 99.0) == 50.0
    assert trtexec_percentile(fifty, 90.0) == 45.0
    thousand = [float(v) for v in range(1, 1001)]
    assert trtexec_percentile(thousand, 99.0) == 991.0  # (1 - 0.99f) * 1000 = 9.99999 -> 9 excluded
    assert trtexec_percentile([7.0], 99.0) == 7.0


def test_median_of_odd_and_even_counts() -> None:
    assert trtexec_median([1.0, 2.0, 9.0]) == 2.0
    assert trtexec_median([1.0, 2.0, 4.0, 9.0]) == 3.0


def test_stats_from_unsorted_samples() -> None:
    stats = LatencyStats.from_samples([4.0, 2.0, 6.0, 8.0])
    assert (stats.count, stats.min_ms, stats.max_ms, stats.mean_ms, stats.median_ms) == (4, 2.0, 8.0, 5.0, 5.0)
    assert math.isclose(stats.cv, math.sqrt(5.0) / 5.0)
    assert stats.p99_ms == 8.0


def test_report_round_trip() -> None:
    stats = LatencyStats.from_samples([1.0, 2.0, 3.0])
    result = LatencyResult(label="int8", runtime="onnxruntime-cpu", runtime_version="1.32.0", model="m.onnx",
                           batch=8, seq=128, warmup_ms=200.0, latency=stats, compute=stats,
                           throughput_qps=400.0, flags={"iterations": 50})
    report = LatencyReport(results=(result,), skipped=("x tensorrt: no GPU",), host={"machine": "x86_64"})
    again = LatencyReport.from_json(report.to_json())
    assert again == report
    assert again.results[0].sequences_per_s == pytest.approx(3200.0)


def _report() -> LatencyReport:
    stats = LatencyStats.from_samples([1.0, 2.0, 4.0])
    result = LatencyResult(label="fp32", runtime="tensorrt", runtime_version="10.9", model="e", batch=2, seq=32,
                           warmup_ms=100.0, latency=stats, compute=stats, h2d=stats, d2h=stats,
                           throughput_qps=10.0, flags={"iterations": 5, "cuda_graphs": False, "threads": None,
                                                       "host_memory": "pageable", "duration_s": 0.5})
    return LatencyReport(results=(result,), host={"machine": "x86_64"})


def test_report_json_shape() -> None:
    data = json.loads(_report().to_json())
    assert sorted(data) == ["host", "results", "skipped", "version"] and data["version"] == 2
    assert sorted(data["results"][0]) == ["batch", "compute", "d2h", "flags", "h2d", "label", "latency", "model",
                                          "runtime", "runtime_version", "seq", "throughput_qps", "warmup_ms"]
    assert data["results"][0]["flags"]["cuda_graphs"] is False and data["results"][0]["latency"]["count"] == 3
    assert LatencyReport.from_json(_report().to_json()) == _report()


@pytest.mark.parametrize(("path", "key", "where"), [
    ((), "hots", r"\$; allowed: results, skipped, host, version; did you mean 'host'"),
    (("results", 0), "sequences_per_s", r"\$\.results\[0\]; allowed: label, runtime"),
    (("results", 0, "h2d"), "p50_ms", r"\$\.results\[0\]\.h2d; allowed: count, min_ms"),
])
def test_unknown_keys_are_named_with_their_place(path: tuple[str | int, ...], key: str, where: str) -> None:
    data = json.loads(_report().to_json())
    node = data
    for step in path:
        node = node[step]
    node[key] = 1.0
    with pytest.raises(ConfigError, match=rf"latency report: unknown key '{key}' at {where}"):
        LatencyReport.from_json(json.dumps(data))


def test_a_version_1_report_is_refused_by_version() -> None:
    data = json.loads(_report().to_json())
    data["version"] = 1
    data["results"][0]["sequences_per_s"] = 20.0  # what version 1 stored
    with pytest.raises(ConfigError, match="latency report version 1 not supported; expected 2"):
        LatencyReport.from_json(json.dumps(data))


def test_flags_take_only_scalars() -> None:
    data = json.loads(_report().to_json())
    data["results"][0]["flags"]["providers"] = ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match=r"\$\.results\[0\]\.flags"):
        LatencyReport.from_json(json.dumps(data))
