"""Analysis stage: a readable text table of a GraphReport (printed by the CLI)."""

from __future__ import annotations

from builder.graph.report import GraphReport, RoleAssignment

_ARCH_NOTE = {"bert": "post-LN, BERT-style", "gpt": "pre-LN, GPT-style", "llama": "pre-RMSNorm, Llama-style",
              "unknown": "neither BERT-, GPT- nor Llama-style"}
_NAME_WIDTH = 56


def _shorten(text: str, width: int = _NAME_WIDTH) -> str:
    """Keep the end of long node names (the distinguishing part), marking the cut with '...'."""
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _row(a: RoleAssignment) -> tuple[str, str, str, str, str]:
    layer = "-" if a.layer is None else str(a.layer)
    weight = "" if a.weight is None else f"{_shorten(a.weight, 28)} [axis {a.weight_axis}]"
    if a.weight_path:
        weight += " via " + ",".join(_shorten(n, 20) for n in a.weight_path)
    if a.weight_shared_with:
        weight += f" shared with {len(a.weight_shared_with)}"
    return (layer, a.role.value, a.op_type, _shorten(a.node), weight)


def format_report(report: GraphReport) -> str:
    """Header line, one row per assignment (graph order), then warnings."""
    note = _ARCH_NOTE.get(report.architecture, report.architecture)
    hidden = "?" if report.hidden_size is None else str(report.hidden_size)
    heads = ""
    if report.num_heads is not None:
        kv = "" if report.num_kv_heads in (None, report.num_heads) else f" ({report.num_kv_heads} key/value)"
        heads = f", {report.num_heads} heads{kv} of {report.head_dim}"
    lines = [
        f"model {report.model_name}: architecture {report.architecture} ({note}), "
        f"{report.num_layers} layers, hidden size {hidden}{heads}, {len(report.assignments)} roles",
        "",
    ]
    header = ("layer", "role", "op", "node", "weight")
    rows = [header, *(_row(a) for a in report.assignments)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for text in report.warnings:
        lines.append(f"warning: {text}")
    return "\n".join(lines) + "\n"
