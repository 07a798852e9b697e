"""Evaluation stage: text and Markdown tables of AccuracyReports (the CLI and the benchmark print them)."""

from __future__ import annotations

from collections.abc import Sequence

from builder.evaluate.layers import format_layer_table
from builder.evaluate.report import AccuracyReport, LanguageFigures, SentenceFigures

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
    """One table row of the sentence-encoder summary columns (see :data:`SUMMARY_HEADER`; "-" where absent)."""
    s = report.sentence
    return (
        report.model_name,
        _pct(s.probe_accuracy if s else None),
        _pct(s.probe_accuracy_refit if s else None),
        _num(s.cosine_mean if s else None),
        _num(s.cosine_min if s else None),
        _num(s.spearman if s else None),
        _pct(report.int8_gemm_share),
    )


LANGUAGE_HEADER = ("model", "perplexity", "vs FP32", "next-token top-1", "KL", "INT8 GEMM share")


def language_row(report: AccuracyReport) -> tuple[str, ...]:
    """One table row of the language-model summary columns (see :data:`LANGUAGE_HEADER`)."""
    lm = report.language
    return (
        report.model_name,
        _num(lm.perplexity if lm else None, 3),
        "-" if lm is None else f"{100 * (lm.perplexity_ratio - 1):+.2f}%",
        _pct(lm.top1_agreement if lm else None),
        _num(lm.kl_mean if lm else None),
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


def _sentence_lines(s: SentenceFigures) -> list[str]:
    return [
        f"  sentence embedding           {s.embedding}; {s.num_test} test sentences, {s.num_train} probe train "
        f"sentences, {s.num_pairs} rated pairs",
        f"  probe accuracy (FP32 probe)  {_pct(s.probe_accuracy)}   (FP32 {_pct(s.reference_probe_accuracy)},"
        f" delta {100.0 * (s.probe_accuracy - s.reference_probe_accuracy):+.2f} points)",
        f"  probe accuracy (refit)       {_pct(s.probe_accuracy_refit)}",
        f"  cosine to FP32 mean / min    {_num(s.cosine_mean)} / {_num(s.cosine_min)}",
        f"  Spearman (Lee pairs)         {_num(s.spearman)}   (FP32 {_num(s.reference_spearman)})",
    ]


def _language_lines(lm: LanguageFigures) -> list[str]:
    lines = [
        f"  held-out text                {lm.corpus}",
        f"  perplexity                   {lm.perplexity:.4f}   (FP32 {lm.reference_perplexity:.4f}, "
        f"{100 * (lm.perplexity_ratio - 1):+.2f}%; {lm.windows} windows of {lm.window} tokens, "
        f"{lm.tokens} predicted tokens)",
        f"  next-token top-1 vs FP32     {_pct(lm.top1_agreement)}",
        f"  KL(FP32 || model) per token  {lm.kl_mean:.5f} nats",
    ]
    for name, check in (("cached vs full sequence", lm.cache_check), ("  (FP32)", lm.reference_cache_check)):
        if check is not None:
            state = "within" if check.within else "EXCEEDS"
            argmax = "equal" if check.argmax_equal else "DIFFERS"
            lines.append(f"  {name:<28} max |diff| {check.max_abs_diff:.3g} over {check.positions} positions, "
                         f"{state} tolerance {check.tolerance:.3g}; argmax {argmax}")
    for g in lm.generation:
        lines.append(f"  generation {g.prompt!r} -> {g.text!r}  ({g.agreement}/{len(g.tokens)} tokens as FP32)")
        if g.tokens != g.reference_tokens:
            lines.append(f"  {'':<10} FP32: {g.reference_text!r}")
    return lines


def format_accuracy(report: AccuracyReport) -> str:
    """The whole report as text: outputs, task figures, skipped figures, per-layer error and warnings."""
    lines = [f"model {report.model_name}:"]
    for o in report.outputs:
        extra = "" if o.top1_agreement is None else (
            f", top-1 {_pct(o.top1_agreement)}, KL {_num(o.kl_mean, 5)}")
        lines.append(f"  output {o.name!r} ({o.kind}, {o.vectors} vectors): cosine mean {o.cosine_mean:.4f} "
                     f"min {o.cosine_min:.4f}, rel err {o.relative_error:.4f}, max abs {o.max_abs_error:.4g}{extra}")
    if report.sentence is not None:
        lines += _sentence_lines(report.sentence)
    if report.language is not None:
        lines += _language_lines(report.language)
    lines.append(f"  INT8 GEMM-FLOP share         {_pct(report.int8_gemm_share)}")
    lines += [f"  skipped {s.figure}: {s.reason}" for s in report.skipped]
    if report.peak_rss_mib is not None:
        lines.append(f"  peak memory (RSS)            {report.peak_rss_mib:.0f} MiB")
    if report.layer_errors:
        lines += ["", "per-layer error of the residual stream against FP32:", format_layer_table(report.layer_errors)]
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"
