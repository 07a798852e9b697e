"""Scale-out stage: the sweep's one table (``sweep.json``, ``sweep.md``) and its Pareto plot (``pareto.png``).

One row per engine: recipe, backend, architecture and profile, the plan's size and build time from its
manifest, the INT8 GEMM-FLOP share from its plan, and the recipe's accuracy (AccuracyReport) where it was
evaluated. The plot puts engine size (or latency, where a latency was measured) against the cosine to FP32
and marks the Pareto front: no other engine is both smaller and more accurate.
"""

from __future__ import annotations

from pathlib import Path

from builder.backends.options import ShapeProfile
from builder.evaluate.pareto import pareto_front
from calib.artifact_io import atomic_write_text
from calib.schema import Schema, decode_json, to_json

SWEEP_VERSION = 1


class SweepRow(Schema, frozen=True, kw_only=True):
    """One engine of the sweep."""

    recipe: str
    backend: str
    backend_version: str
    architecture: str
    profile: ShapeProfile
    engine_dir: str  # relative to the sweep folder
    plan_bytes: int
    build_time_s: float
    reused: bool
    int8_gemm_flop_share: float
    cosine_mean: float | None = None  # of the recipe's model against FP32 (None: not evaluated)
    probe_accuracy: float | None = None
    latency_ms: float | None = None  # None: not profiled (TensorRT latency needs the GPU)


class SweepReport(Schema, frozen=True, kw_only=True):
    """Every engine of one sweep (``sweep.json``)."""

    model: str
    calibration: str  # the shared Statistics file, relative to the sweep folder
    rows: tuple[SweepRow, ...]
    version: int = SWEEP_VERSION

    def to_json(self) -> str:
        return to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> SweepReport:
        return decode_json(text, cls, "sweep.json", version=SWEEP_VERSION)


def _profile(p: ShapeProfile) -> str:
    return f"b{p.batch.min}/{p.batch.opt}/{p.batch.max} s{p.seq.min}/{p.seq.opt}/{p.seq.max}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(report: SweepReport) -> str:
    """The Markdown table of ``sweep.md``."""
    lines = ["| recipe | backend | arch | profile | plan MiB | build s | INT8 GEMM share | cosine | probe acc | "
             "engine |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in report.rows:
        build = "reused" if r.reused else f"{r.build_time_s:.1f}"
        lines.append(f"| {r.recipe} | {r.backend} {r.backend_version} | {r.architecture} | {_profile(r.profile)} | "
                     f"{r.plan_bytes / 2**20:.1f} | {build} | {r.int8_gemm_flop_share:.1%} | "
                     f"{_num(r.cosine_mean, '.4f')} | {_num(r.probe_accuracy, '.2%')} | {r.engine_dir} |")
    return "\n".join(lines) + "\n"


def write_pareto(report: SweepReport, path: Path) -> Path | None:
    """The Pareto plot of the rows with an accuracy (None when no row has one)."""
    rows = [r for r in report.rows if r.cosine_mean is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = all(r.latency_ms is not None for r in rows)
    cost = [float(r.latency_ms) if timed and r.latency_ms is not None else r.plan_bytes / 2**20 for r in rows]
    accuracy = [float(r.cosine_mean) for r in rows if r.cosine_mean is not None]
    front = set(pareto_front(list(zip(cost, accuracy, strict=True))))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels: dict[str, list[int]] = {}  # one label per recipe (its engines share the recipe's accuracy)
    for i, r in enumerate(rows):
        ax.scatter(cost[i], accuracy[i], marker="o" if i in front else "x", color="C0" if i in front else "C7")
        labels.setdefault(r.recipe, []).append(i)
    for recipe, members in labels.items():
        archs = ", ".join(dict.fromkeys(rows[i].architecture for i in members))
        first = min(members, key=lambda i: cost[i])
        ax.annotate(f"{recipe} ({archs})", (cost[first], accuracy[first]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.margins(x=0.2, y=0.15)
    ordered = sorted(front, key=lambda i: cost[i])
    ax.plot([cost[i] for i in ordered], [accuracy[i] for i in ordered], color="C0", linewidth=1)
    ax.set_xlabel("latency (ms)" if timed else "engine plan size (MiB)")
    ax.set_ylabel("cosine to FP32 (mean, held-out sentences)")
    ax.set_title(f"{Path(report.model).stem}: {len(rows)} engines (o: Pareto front)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(report: SweepReport, folder: Path) -> list[Path]:
    """``sweep.json``, ``sweep.md`` and (with accuracies) ``pareto.png`` in ``folder``."""
    written = [folder / "sweep.json", folder / "sweep.md"]
    atomic_write_text(written[0], report.to_json())
    atomic_write_text(written[1], f"# Sweep of {report.model}\n\n{format_table(report)}")
    plot = write_pareto(report, folder / "pareto.png")
    return written + ([plot] if plot is not None else [])
