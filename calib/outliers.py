"""Calibration stage: the activation-outlier report after Bondarenko et al. 2021 (arXiv 2109.12948, section 3).

Per tensor (with its layer and role): max|x| against high percentiles of |x| (how much of the range only a
few values use), the embedding dimensions whose own max|x| exceeds ``factor`` times the median dimension's
(the structured outliers), the share of the range only those dimensions reach, and the tokens whose rows
carry the largest values. Rendered as JSON, a Markdown table and PNG plots of the per-dimension range per
layer (matplotlib, imported lazily inside :func:`plot_dimension_ranges`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calib.artifact_io import atomic_write_bytes
from calib.methods import amax_percentile
from calib.schema import Schema, decode_json, to_builtins, to_json
from calib.statistics import TensorStatistics

REPORT_VERSION = 2
DEFAULT_FACTOR = 6.0
PERCENTILES = (99.0, 99.9, 99.99)
PLOT_ROLES = ("fc2", "ffn_residual")  # Bondarenko's h (FFN output) and y (FFN residual sum)

Label = tuple[int | None, str]  # (layer, role)


class OutlierRow(Schema, frozen=True, kw_only=True):
    """The outlier statistics of one tensor."""

    tensor: str
    layer: int | None
    role: str
    width: int  # size of the last (feature) axis
    amax: float
    percentiles: tuple[float, ...]  # amax at PERCENTILES
    max_over_p9999: float
    outlier_dims: tuple[int, ...]  # descending by their max|x|
    outlier_dim_amax: tuple[float, ...]
    median_dim_amax: float
    range_share: float  # 1 - (largest non-outlier dim amax) / amax: the part of the range only outliers reach
    top_tokens: tuple[tuple[str, float, int], ...]  # (token, max|x| of its rows, rows seen)


# Bondarenko et al. 2021 (arXiv 2109.12948) mixed precision: a layer is flagged when its FFN output h or FFN
# residual sum y has max|x| at least this many times its 99.99th percentile (a few structured outlier values own
# most of the INT8 range). The threshold is ours; on all-MiniLM-L6-v2 it flags layers 0-2, the three layers
# whose FFN is most sensitive to INT8 (measured by leaving one layer's FFN in FP16).
MP_OUTLIER_RATIO = 10.0
MP_ROLES = ("fc2", "ffn_residual")


class OutlierReport(Schema, frozen=True, kw_only=True):
    """Outlier statistics of every observed tensor that has a feature axis."""

    version: int = REPORT_VERSION
    factor: float
    rows: tuple[OutlierRow, ...]

    def flagged_layers(self, ratio: float = MP_OUTLIER_RATIO, roles: Sequence[str] = MP_ROLES) -> tuple[int, ...]:
        """Layers whose tensors of ``roles`` have max|x| >= ``ratio`` x their 99.99th percentile."""
        return tuple(sorted({r.layer for r in self.rows if r.layer is not None and r.role in roles
                             and r.max_over_p9999 >= ratio}))

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "outlier report") -> OutlierReport:
        return decode_json(text, cls, where, version=REPORT_VERSION)

    def dimension_counts(self, width: int | None = None) -> dict[int, int]:
        """How many tensors of ``width`` (default: the most common width, the hidden size) name each outlier
        dimension, most frequent first."""
        if width is None and self.rows:
            widths = [r.width for r in self.rows]
            width = max(set(widths), key=lambda w: (widths.count(w), -w))
        counts: dict[int, int] = {}
        for row in self.rows:
            if row.width != width:
                continue
            for dim in row.outlier_dims:
                counts[dim] = counts.get(dim, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_json(self) -> str:
        return to_json(self)

    def to_markdown(self) -> str:
        header = ("| layer | role | tensor | max | p99.99 | max/p99.99 | outlier dims (max) | range share | "
                  "top tokens |\n|---|---|---|---|---|---|---|---|---|")
        lines = [header]
        for r in self.rows:
            dims = ", ".join(f"{d} ({a:.1f})" for d, a in zip(r.outlier_dims[:4], r.outlier_dim_amax[:4], strict=True))
            tokens = ", ".join(f"{t} ({v:.1f})" for t, v, _ in r.top_tokens[:3])
            short = r.tensor if len(r.tensor) <= 48 else "…" + r.tensor[-47:]
            lines.append(f"| {'-' if r.layer is None else r.layer} | {r.role} | `{short}` | {r.amax:.2f} | "
                         f"{r.percentiles[-1]:.2f} | {r.max_over_p9999:.1f} | {dims or '-'} | {r.range_share:.0%} | "
                         f"{tokens or '-'} |")
        summary = ", ".join(f"{d} ({n} tensors)" for d, n in list(self.dimension_counts().items())[:8])
        return "\n".join(lines) + (f"\n\nOutlier dimensions of the residual width (max|x| > {self.factor:g} x median "
                                    f"dimension): {summary or 'none'}\n")


def _row(stats: TensorStatistics, label: Label, factor: float, token_name: Callable[[int], str]) -> OutlierRow | None:
    amax_d = stats.dims.channel_amax if stats.dims is not None else None
    if "histogram" not in stats.observers:
        return None
    hist = stats.histogram.histogram
    if amax_d is None or stats.minmax.count == 0 or stats.minmax.abs_max == 0.0:
        return None
    amax = stats.minmax.abs_max
    pct = tuple(amax_percentile(hist.counts, hist.bin_width, p, amax) for p in PERCENTILES)
    median = float(np.median(amax_d))
    flagged = np.nonzero(amax_d > factor * max(median, 1e-12))[0]
    order = flagged[np.argsort(-amax_d[flagged], kind="stable")]
    rest = np.delete(amax_d, order)
    share = 1.0 - (float(rest.max()) / amax if rest.size else 0.0)
    tokens: tuple[tuple[str, float, int], ...] = ()
    if stats.tokens is not None and stats.tokens.token_ids.size:
        top = np.argsort(-stats.tokens.max_abs, kind="stable")[:5]
        tokens = tuple((token_name(int(stats.tokens.token_ids[i])), float(stats.tokens.max_abs[i]),
                        int(stats.tokens.counts[i])) for i in top)
    return OutlierRow(tensor=stats.tensor, layer=label[0], role=label[1], width=int(amax_d.size), amax=amax,
                      percentiles=pct,
                      max_over_p9999=amax / pct[-1], outlier_dims=tuple(int(d) for d in order),
                      outlier_dim_amax=tuple(float(amax_d[d]) for d in order), median_dim_amax=median,
                      range_share=share if order.size else 0.0, top_tokens=tokens)


def outlier_report(stats: Mapping[str, TensorStatistics], labels: Mapping[str, Label], *,
                   factor: float = DEFAULT_FACTOR, token_name: Callable[[int], str] | None = None) -> OutlierReport:
    """The report over every tensor of ``stats`` with per-dimension statistics, ordered by (layer, role)."""
    name_of = token_name or (lambda i: str(i))
    rows = [row for name, s in stats.items()
            if (row := _row(s, labels.get(name, (None, "tensor")), factor, name_of)) is not None]
    rows.sort(key=lambda r: (-1 if r.layer is None else r.layer))
    return OutlierReport(factor=factor, rows=tuple(rows))


def plot_dimension_ranges(stats: Mapping[str, TensorStatistics], labels: Mapping[str, Label], role: str,
                          path: Path, factor: float = DEFAULT_FACTOR) -> bool:
    """PNG of the per-dimension range [min, max] per layer for tensors of ``role``; False if there are none."""
    chosen = sorted(((labels[n][0], n) for n in stats if n in labels and labels[n][1] == role
                     and stats[n].dims is not None), key=lambda t: -1 if t[0] is None else t[0])
    if not chosen:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(chosen), 1, figsize=(10, 1.8 * len(chosen) + 0.6), sharex=True, squeeze=False)
    for ax, (layer, name) in zip(axes[:, 0], chosen, strict=True):
        dims = stats[name].dims
        assert dims is not None and dims.dim_min is not None and dims.dim_max is not None
        x = np.arange(dims.dim_min.size)
        ax.vlines(x, dims.dim_min, dims.dim_max, linewidth=0.8, color="tab:blue")
        amax_d = np.maximum(-dims.dim_min, dims.dim_max)
        median = float(np.median(amax_d))
        for d in np.nonzero(amax_d > factor * max(median, 1e-12))[0]:
            ax.annotate(str(int(d)), (float(d), float(dims.dim_max[d])), fontsize=7, color="tab:red")
        ax.set_ylabel(f"layer {layer}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("embedding dimension")
    fig.suptitle(f"per-dimension range [min, max] of {role} outputs (outlier dims > {factor:g}x median in red)",
                 fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def write_outlier_report(report: OutlierReport, stats: Mapping[str, TensorStatistics], labels: Mapping[str, Label],
                         folder: Path, roles: Sequence[str] = PLOT_ROLES) -> list[Path]:
    """Write ``outliers.json``, ``outliers.md`` and one ``outliers_<role>.png`` per plotted role."""
    written = [folder / "outliers.json", folder / "outliers.md"]
    atomic_write_bytes(written[0], report.to_json().encode())
    atomic_write_bytes(written[1], report.to_markdown().encode())
    for role in roles:
        png = folder / f"outliers_{role}.png"
        if plot_dimension_ranges(stats, labels, role, png, report.factor):
            written.append(png)
    return written


def report_dict(report: OutlierReport) -> dict[str, Any]:
    """The report as plain data (what ``outliers.json`` holds)."""
    data: dict[str, Any] = to_builtins(report)
    return data
