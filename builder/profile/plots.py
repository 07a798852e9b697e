"""Profiling stage: PNG plots of a LatencyReport (matplotlib's object API; no global pyplot state).

- latency against batch: one panel per sequence length, one line per (label, runtime), mean latency with
  the p99 drawn as the upper error bar;
- accuracy against latency: one point per label at a chosen batch x sequence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from builder.profile.report import LatencyReport
from calib.artifact_io import atomic_write_bytes
from calib.errors import ConfigError


def _save(figure: Any, path: Path) -> None:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def plot_latency_vs_batch(report: LatencyReport, path: Path) -> None:
    """One panel per sequence length: mean latency (ms) against batch, p99 as the upper error bar."""
    from matplotlib.figure import Figure

    if not report.results:
        raise ConfigError("the latency report has no results to plot")
    seqs = sorted({r.seq for r in report.results})
    figure = Figure(figsize=(4.2 * len(seqs), 3.6), layout="constrained")
    axes = figure.subplots(1, len(seqs), squeeze=False)[0]
    series = sorted({(r.label, r.runtime) for r in report.results})
    for ax, seq in zip(axes, seqs, strict=True):
        for label, runtime in series:
            points = sorted((r.batch, r.latency.mean_ms, r.latency.p99_ms) for r in report.results
                            if r.seq == seq and r.label == label and r.runtime == runtime)
            if not points:
                continue
            batches = [p[0] for p in points]
            means = [p[1] for p in points]
            upper = [p[2] - p[1] for p in points]
            ax.errorbar(batches, means, yerr=[[0.0] * len(points), upper], marker="o", capsize=3,
                        label=f"{label} ({runtime})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r.batch for r in report.results}))
        ax.get_xaxis().set_major_formatter("{x:.0f}")
        ax.set_xlabel("batch")
        ax.set_ylabel("latency ms (mean, bar to p99)")
        ax.set_title(f"seq {seq}")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    _save(figure, path)


def read_accuracy(path: Path) -> dict[str, float]:
    """Accuracy per label from an AccuracyReport JSON (model_name, probe_accuracy) or a {label: value} map."""
    if not path.is_file():
        raise ConfigError(f"accuracy file {str(path)!r} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("sentence"), dict) and "model_name" in data:  # report v2
        data = {"model_name": data["model_name"], "probe_accuracy": data["sentence"]["probe_accuracy"]}
    if isinstance(data, dict) and "probe_accuracy" in data and "model_name" in data:
        return {str(data["model_name"]): float(data["probe_accuracy"])}
    if isinstance(data, dict) and all(isinstance(v, int | float) for v in data.values()):
        return {str(k): float(v) for k, v in data.items()}
    raise ConfigError(
        f"{str(path)!r} is neither an accuracy report (model_name, probe_accuracy) nor a {{label: accuracy}} map"
    )


def plot_accuracy_vs_latency(
    report: LatencyReport, accuracy: Mapping[str, float], path: Path, *, batch: int, seq: int
) -> None:
    """Accuracy against mean latency at ``batch`` x ``seq``, one point per (label, runtime)."""
    from matplotlib.figure import Figure

    points = [(r.label, r.runtime, r.latency.mean_ms, accuracy[r.label]) for r in report.results
              if r.batch == batch and r.seq == seq and r.label in accuracy]
    if not points:
        raise ConfigError(
            f"no profiled label at batch {batch} x seq {seq} has an accuracy; labels with accuracy: "
            f"{', '.join(sorted(accuracy)) or 'none'}"
        )
    figure = Figure(figsize=(5.0, 3.8), layout="constrained")
    ax = figure.subplots()
    for label, runtime, latency_ms, acc in points:
        ax.scatter([latency_ms], [100.0 * acc])
        ax.annotate(f"{label} ({runtime})", (latency_ms, 100.0 * acc), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel(f"mean latency ms (batch {batch}, seq {seq})")
    ax.set_ylabel("accuracy %")
    ax.grid(True, alpha=0.3)
    _save(figure, path)
