"""trtexec-style latency statistics and the LatencyReport round trip."""

from __future__ import annotations

import math

import pytest

from builder.profile.report import (
    LatencyReport,
    LatencyResult,
    LatencyStats,
    trtexec_median,
    trtexec_percentile,
)


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
