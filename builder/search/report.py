"""Precision search: the report artifacts (``search.json``, ``candidates.json`` / ``.md``, ``pareto.png``).

Rendered in memory (text and PNG bytes); the CLI writes them. The candidate table lists every evaluated
point in order: its phase, its 16-bit units, the INT8 share of GEMM multiply-accumulates, the islands, every
metric on its slice and the time it took. The Pareto plot puts the INT8 share against the budget's metric for
the full-slice candidates, draws the front (no other candidate has more INT8 and a better metric), the budget
line, the answer and the shipped presets measured on the same slice.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import msgspec

from builder.search.search import Point
from calib.schema import Schema, decode_json, to_json

REPORT_VERSION = 1


class Timing(Schema, frozen=True, kw_only=True):
    """Wall times and the machine's load while they were measured."""

    prepare_s: float  # analysis, calibration (or its reuse) and the slice's FP32 reference, before the search
    search_s: float  # the search itself: found in prepare_s + search_s
    presets_s: float = 0.0
    test_s: float = 0.0
    new_evaluations: int
    recorded_evaluations: int  # points taken from an earlier run's journal
    segments_run: int  # over the new evaluations: segments that ran ...
    segments_total: int  # ... of the segments they hold (the rest came from the prefix cache)
    evaluation_s: float  # summed over the new evaluations (planning, lowering, running)
    cpus: int
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]


class SearchReport(Schema, frozen=True, kw_only=True):
    """``search.json``: the question, the answer, how it was found and what it cost."""

    model: str
    base_recipe: str
    recipe_file: str
    budget: str
    metric: str
    threshold: float
    reference: float  # the FP32 value of the metric on the slice
    slice: str
    samples: int
    quick_samples: int
    granularity: str
    fallback_precision: str
    met: bool
    stop: str
    feasible: bool | None
    answer: Point
    units: tuple[str, ...]
    sensitivity: dict[str, float]
    order: tuple[str, ...]
    presets_skipped: dict[str, str]
    timing: Timing
    # the answer's figures on the test split (builder.evaluate), reported apart
    test: dict[str, float] = msgspec.field(default_factory=dict)
    test_split: str = ""
    version: int = REPORT_VERSION

    def to_json(self) -> str:
        return to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "search.json") -> SearchReport:
        return decode_json(text, cls, where, version=REPORT_VERSION)


class CandidateTable(Schema, frozen=True, kw_only=True):
    """``candidates.json``: every evaluated point, in order."""

    metric: str
    threshold: float
    points: tuple[Point, ...]
    version: int = REPORT_VERSION

    def to_json(self) -> str:
        return to_json(self)


def describe(point: Point, units: Sequence[str], limit: int = 6) -> str:
    """The candidate's 16-bit units, or (when most are in 16 bits) the units it keeps in INT8."""
    if point.label:
        return f"preset {point.label}"
    if not point.fallback:
        return "none (all INT8)"
    chosen = set(point.fallback)
    int8 = [u for u in units if u not in chosen]
    if len(int8) < len(chosen):
        listed = ", ".join(int8[:limit]) + (", ..." if len(int8) > limit else "")
        return f"all but INT8 {listed}" if int8 else f"all {len(chosen)}"
    return f"{len(chosen)}: {', '.join(point.fallback[:limit])}{', ...' if len(chosen) > limit else ''}"


def meets(point: Point, metric: str, threshold: float, higher_is_better: bool) -> bool:
    value = point.value(metric)
    return value >= threshold if higher_is_better else value <= threshold


def format_candidates(points: Sequence[Point], units: Sequence[str], metrics: Sequence[str],
                      metric: str, threshold: float, higher_is_better: bool) -> str:
    """The Markdown candidate table (one row per evaluated point)."""
    head = "| # | phase | 16-bit units | INT8 share | islands | " + " | ".join(metrics) + \
        " | slice | meets | s | segments run |"
    lines = [head, "|---:|---|---|---:|---:|" + "---:|" * len(metrics) + "---:|---|---:|---:|"]
    for p in points:
        m = p.measurement
        values = " | ".join(f"{m.metrics[k]:.6g}" if k in m.metrics else "-" for k in metrics)
        quick = p.key.startswith("quick:")
        verdict = "-" if quick else ("yes" if meets(p, metric, threshold, higher_is_better) else "no")
        seconds = "recorded" if p.reused else f"{m.seconds:.1f}"
        lines.append(f"| {p.index} | {p.phase} | {describe(p, units)} | {m.share:.2%} | {p.islands} | {values} | "
                     f"{m.samples} | {verdict} | {seconds} | {m.segments_run}/{m.segments_total} |")
    return "\n".join(lines) + "\n"


def front(points: Sequence[Point], metric: str, higher_is_better: bool) -> list[Point]:
    """Points no other point beats on both INT8 share and metric, by increasing share."""
    from builder.evaluate.pareto import pareto_front

    sign = 1.0 if higher_is_better else -1.0
    kept = pareto_front([(-p.share, sign * p.value(metric)) for p in points])  # a larger share costs less
    return sorted((points[i] for i in kept), key=lambda p: p.share)


def _plot_value(value: float, metric: str) -> float:
    """What the y axis shows: the distance from FP32 (1 - value) for the cosine and agreement metrics, which sit
    just below 1 (drawn on a log axis), the value itself otherwise."""
    return max(1.0 - value, 1e-9) if metric in LOG_METRICS else value


LOG_METRICS = ("cosine", "cosine-min", "top1")


def _preset_groups(presets: Sequence[Point], metric: str) -> list[tuple[float, float, str]]:
    """Presets at the same point (same share and metric to 6 digits) share one marker and one label."""
    groups: dict[tuple[float, float], list[str]] = {}
    for p in presets:
        groups.setdefault((round(p.share, 6), float(f"{p.value(metric):.6g}")), []).append(p.label)
    return [(share, value, ", ".join(labels)) for (share, value), labels in groups.items()]


def pareto_png(points: Sequence[Point], presets: Sequence[Point], answer: Point, metric: str,
               threshold: float, higher_is_better: bool, title: str) -> bytes:
    """The Pareto plot (INT8 share against ``metric``) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [p for p in points if p.key.startswith("full:")]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))

    def y(value: float) -> float:
        return _plot_value(value, metric)

    ax.scatter([100 * p.share for p in full], [y(p.value(metric)) for p in full], s=14, color="C7",
               label=f"candidates ({len(full)})")
    edge = front(full, metric, higher_is_better)
    ax.plot([100 * p.share for p in edge], [y(p.value(metric)) for p in edge], color="C0", linewidth=1,
            label="Pareto front")
    for index, (share, value, label) in enumerate(_preset_groups(presets, metric)):
        ax.scatter([100 * share], [y(value)], marker="s", s=28, color="C1", label="presets" if index == 0 else None)
        ax.annotate(label, (100 * share, y(value)), fontsize=7, xytext=(-4, 5 if index % 2 else -10),
                    textcoords="offset points", ha="right")
    ax.scatter([100 * answer.share], [y(answer.value(metric))], marker="*", s=160, color="C3", zorder=5,
               label=f"answer ({100 * answer.share:.1f}%, {answer.value(metric):.6g})")
    ax.axhline(y(threshold), color="C3", linestyle="--", linewidth=1, label=f"budget {threshold:.6g}")
    ax.set_xlabel("INT8 share of GEMM multiply-accumulates (%)")
    if metric in LOG_METRICS:
        ax.set_yscale("log")
        ax.set_ylabel(f"1 - {metric} (search slice; lower is closer to FP32)")
    else:
        ax.set_ylabel(f"{metric} (search slice)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def split_figures(accuracy: Any) -> dict[str, float]:
    """The figures of an AccuracyReport (builder.evaluate) that search.json reports for the test split."""
    figures: dict[str, float] = {"int8_gemm_share": accuracy.int8_gemm_share}
    if accuracy.sentence is not None:
        s = accuracy.sentence
        figures.update({"cosine": s.cosine_mean, "cosine-min": s.cosine_min, "probe": s.probe_accuracy,
                        "probe-fp32": s.reference_probe_accuracy,
                        "probe-drop": 100.0 * (s.reference_probe_accuracy - s.probe_accuracy)})
    if accuracy.language is not None:
        lm = accuracy.language
        figures.update({"perplexity": lm.perplexity, "perplexity-fp32": lm.reference_perplexity,
                        "top1": lm.top1_agreement, "kl": lm.kl_mean})
    return figures
