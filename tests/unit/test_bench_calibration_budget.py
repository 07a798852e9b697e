"""The calibration budget's bounds (bench/calibration_budget.py) from measured parts, without running a model."""

from __future__ import annotations

import pytest

from bench.calibration_budget import bounds

PARTS = {"floor session": (0.1, 0.1), "floor batches": (0.9, 1.8), "read file": (0.04, 0.04), "parse": (0.03, 0.03),
         "sha256": (0.05, 0.05), "instrument": (0.04, 0.04), "instrumented session": (0.15, 0.15),
         "export batches": (1.0, 2.0), "collect": (1.7, 3.1), "kernel load (child)": (0.3, 0.5),
         "fold (one thread)": (0.6, 0.6)}


def _report(cores: int, **changes: tuple[float, float]) -> dict[str, object]:
    parts = PARTS | changes
    return {"cores": cores, "parts": {k: {"seconds": w, "cpu_s": c} for k, (w, c) in parts.items()}}


def test_cpu_bound_stream_and_overlapped_one_time_costs() -> None:
    limits = bounds(_report(2))
    assert limits["floor_s"] == pytest.approx(1.0)
    assert limits["collect_ratio"] == pytest.approx(1.7)
    assert limits["stream_bound_s"] == pytest.approx((2.0 + 0.6) / 2)  # above the export's own 1.0 s
    # read + max(parse, hash) + instrument + max(session, kernel load): the overlapped pairs count once
    assert limits["one_time_s"] == pytest.approx(0.04 + 0.05 + 0.04 + 0.3)
    assert limits["bound_ratio"] == pytest.approx(0.15 + 1.3)
    assert limits["bound_ratio_with_one_time"] == pytest.approx(0.43 + 1.3)


def test_with_cores_to_spare_the_export_itself_bounds_the_stream() -> None:
    limits = bounds(_report(8, **{"kernel load (child)": (0.1, 0.2)}))
    assert limits["stream_bound_s"] == pytest.approx(1.0)  # (2.0 + 0.6) / 8 is below the export's wall time
    assert limits["one_time_s"] == pytest.approx(0.04 + 0.05 + 0.04 + 0.15)
