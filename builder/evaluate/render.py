"""Evaluation stage: text and Markdown tables of AccuracyReports (the CLI and the benchmark print them)."""

from __future__ import annotations

from collections.abc import Sequence

from builder.evaluate.layers import format_layer_table
from builder.evaluate.report import AccuracyReport

SUMMARY_HEADER = (
    "model",
    "probe acc (FP32 probe)",
    "probe acc (refit)",
    "cosine mean",
    "cosine min",
    "Spearman",
    "INT8 GEMM share",
)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}%"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_row(report: AccuracyReport) -> tuple[str, ...]:
    """One table row of the summary columns (see :data:`SUMMARY_HEADER`)."""
    return (
        report.model_name,
        _pct(report.probe_accuracy),
        _pct(report.probe_accuracy_refit),
        _num(report.cosine_mean),
        _num(report.cosine_min),
        _num(report.spearman),
        _pct(report.int8_gemm_share),
    )


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str] = SUMMARY_HEADER) -> str:
    """A fixed-width text table, first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_markdown(rows: Sequence[Sequence[str]], header: Sequence[str] = SUMMARY_HEADER) -> str:
    """A GitHub Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out.extend("| " + " | ".join(r) + " |" for r in rows)
    return "\n".join(out) + "\n"


def format_accuracy(report: AccuracyReport) -> str:
    """The whole report as text: the summary against FP32, then the per-layer error table and warnings."""
    lines = [
        f"model {report.model_name}: {report.num_test} test sentences, {report.num_train} probe train sentences, "
        f"{report.num_pairs} rated pairs",
        f"  probe accuracy (FP32 probe)  {_pct(report.probe_accuracy)}   (FP32 {_pct(report.reference_probe_accuracy)},"
        f" delta {100.0 * report.probe_delta:+.2f} points)",
        f"  probe accuracy (refit)       {_pct(report.probe_accuracy_refit)}",
        f"  cosine to FP32 mean / min    {_num(report.cosine_mean)} / {_num(report.cosine_min)}",
        f"  Spearman (Lee pairs)         {_num(report.spearman)}   (FP32 {_num(report.reference_spearman)})",
        f"  INT8 GEMM-FLOP share         {_pct(report.int8_gemm_share)}",
    ]
    if report.layer_errors:
        lines += ["", "per-layer error of the residual stream against FP32:", format_layer_table(report.layer_errors)]
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"
