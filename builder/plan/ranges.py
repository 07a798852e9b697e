"""Planning stage: turning RangeTable entries into the ranges a plan uses.

``max`` is always derived from the observed minimum and maximum; ``percentile``, ``entropy`` and ``mse`` need
a table whose range for the tensor was decided with that method; ``table`` takes whatever the table chose.
Missing ranges are collected and reported together, naming every tensor and what it lacks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from builder.plan.artifact import PegGroup
from builder.recipes.model import RangeChoice, Recipe, Scheme, Settings
from calib.calibrate import RangeSpec, range_table
from calib.collect import Collection
from calib.errors import CalibrationError, ConfigError
from calib.range_table import RangeMethod, RangeTable, TensorRange

_PCT_TOLERANCE = 1e-9


def _requirement(settings: Settings) -> str:
    if settings.scheme == Scheme.FEATURE:
        return "channel_amax"
    if settings.scheme == Scheme.PEG:
        return "dim_min"
    assert settings.range is not None
    if settings.range == RangeChoice.PERCENTILE:
        return f"percentile:{settings.percentile}"
    return settings.range.value


class RangeSource:
    """Looks ranges up in one or more RangeTables."""

    def __init__(self, tables: Sequence[RangeTable]) -> None:
        if not tables:
            raise ConfigError("planning needs at least one RangeTable")
        self._tables = tuple(tables)

    def _entries(self, tensor: str) -> list[TensorRange]:
        return [t.ranges[tensor] for t in self._tables if tensor in t.ranges]

    def _find(self, tensor: str, settings: Settings) -> TensorRange | None:
        entries = self._entries(tensor)
        if not entries:
            return None
        choice = settings.range
        if choice in (RangeChoice.MAX, RangeChoice.TABLE, RangeChoice.FIXED) and settings.scheme == Scheme.TENSOR:
            return entries[0]
        if settings.scheme == Scheme.FEATURE:
            return next((e for e in entries if e.channel_amax is not None), None)
        if settings.scheme == Scheme.PEG:
            return next((e for e in entries if e.dim_min is not None and e.dim_max is not None), None)
        for e in entries:
            if e.method.value != (choice.value if choice else None):
                continue
            if choice == RangeChoice.PERCENTILE and (
                e.percentile is None or settings.percentile is None
                or abs(e.percentile - settings.percentile) > _PCT_TOLERANCE
            ):
                continue
            return e
        return None

    def check(self, needs: Sequence[tuple[str, Settings]]) -> None:
        """Raise one CalibrationError naming every tensor whose required range the tables lack."""
        missing = []
        wanted: set[str] = set()
        for tensor, settings in needs:
            if settings.range == RangeChoice.FIXED and settings.scheme == Scheme.TENSOR:
                continue
            if self._find(tensor, settings) is None:
                have = sorted({e.method.value for e in self._entries(tensor)})
                missing.append(f"{tensor} (needs {_requirement(settings)}; "
                               f"{'has ' + ', '.join(have) if have else 'not in any table'})")
                if have:
                    wanted.add(_requirement(settings))
        if missing:
            hint = ""
            methods = {m.value for m in RangeMethod}
            flags = [f"--method {method}" + (f" --percentile {value}" if value else "")
                     for method, _, value in (w.partition(":") for w in sorted(wanted)) if method in methods]
            if flags:
                hint = (f". Calibrate again with {', '.join(flags)} and pass every table with --ranges (or run the "
                        "pipeline, which decides every range a recipe needs from one pass)")
            raise CalibrationError(f"the range table lacks {len(missing)} range(s) the recipe asks for: "
                                   + "; ".join(missing) + hint)

    def amax(self, tensor: str, settings: Settings) -> tuple[float, str]:
        """The symmetric per-tensor range and a method label."""
        if settings.range == RangeChoice.FIXED:
            assert settings.fixed_amax is not None
            return float(settings.fixed_amax), "fixed"
        entry = self._find(tensor, settings)
        if entry is None:
            raise CalibrationError(f"no {_requirement(settings)} range for tensor {tensor!r}")
        if settings.range == RangeChoice.MAX:
            # An asymmetric range is made symmetric, never dropped (DESIGN.md section 3).
            return max(abs(entry.observed_min), abs(entry.observed_max)), "max"
        if settings.range == RangeChoice.TABLE:
            return entry.amax, f"table:{entry.method.value}"
        label = f"percentile:{entry.percentile}" if entry.method == RangeMethod.PERCENTILE else entry.method.value
        return entry.amax, label

    def observed(self, tensor: str) -> tuple[float, float]:
        """The smallest and largest value of ``tensor`` seen in calibration."""
        entries = self._entries(tensor)
        if not entries:
            raise CalibrationError(f"no range for tensor {tensor!r} in any table")
        return entries[0].observed_min, entries[0].observed_max

    def stats(self, tensor: str, name: str) -> tuple[float, ...]:
        """A per-dimension statistic (``channel_amax``, ``dim_min``, ``dim_max``) of ``tensor``."""
        for entry in self._entries(tensor):
            value = getattr(entry, name)
            if value is not None:
                return tuple(value)
        raise CalibrationError(f"the range table has no {name} statistics for tensor {tensor!r}")


def feature_scales(channel_amax: Sequence[float], alpha: float) -> tuple[tuple[float, ...], float]:
    """HERO FWQ scales S_j = c_j ** alpha (c_j = per-feature amax) and the per-tensor amax after dividing by S.

    alpha = 1 makes every folded feature span [-1, 1] (pure per-feature scaling); smaller alpha moves less of
    the range into the next weight's rows (METHODS.md section 2.2; the knob follows SmoothQuant's migration).
    """
    c = np.asarray(channel_amax, dtype=np.float64)
    floor = max(float(c.max()) * 1e-4, 1e-8)
    c = np.maximum(c, floor)
    s = np.power(c, alpha)
    s = s / float(np.max(s)) if alpha > 0 else s  # normalize: the largest feature keeps its scale
    amax = float(np.max(c / s))
    return tuple(float(v) for v in s.astype(np.float32)), amax


def centered_range(amax: float, observed_min: float, observed_max: float) -> tuple[float, float]:
    """(offset c, half-width h) of a centered INT8 range: the symmetric clip [-amax, amax] intersected with the
    observed [min, max] is [lo, hi]; c = (lo + hi) / 2 and h = (hi - lo) / 2, so x - c is quantized with the
    symmetric scale h / 127. A one-sided tensor (a GELU output, a LayerNorm output with one-signed outlier
    dimensions) gets up to twice the resolution of the symmetric range. h is 0 for a constant tensor.
    """
    lo = max(float(observed_min), -float(amax))
    hi = min(float(observed_max), float(amax))
    if not hi > lo:
        return 0.0, 0.0
    return (lo + hi) / 2.0, (hi - lo) / 2.0


def peg_groups(tensor: str, dim_min: Sequence[float], dim_max: Sequence[float], k: int) -> tuple[PegGroup, ...]:
    """Bondarenko PEG (METHODS.md section 3.3): range-sorted permutation split into K equal groups.

        r_j = max_j - min_j;  pi = argsort(r) (stable, ascending);  group g = pi[g*d/K : (g+1)*d/K]

    All outlier dimensions land in the last group. Each group's symmetric range is the largest |value| over
    its dimensions (TensorRT needs zero-point 0).
    """
    lo = np.asarray(dim_min, dtype=np.float64)
    hi = np.asarray(dim_max, dtype=np.float64)
    d = lo.size
    if d % k != 0:
        raise ConfigError(f"tensor {tensor!r}: PEG needs the width {d} to be a multiple of groups={k}")
    order = np.argsort(hi - lo, kind="stable")
    size = d // k
    groups = []
    for g in range(k):
        dims = np.sort(order[g * size:(g + 1) * size])
        amax = float(np.max(np.maximum(np.abs(lo[dims]), np.abs(hi[dims]))))
        groups.append(PegGroup(dims=tuple(int(i) for i in dims), amax=max(amax, 1e-8)))
    return tuple(groups)


def required_specs(recipe: Recipe, primary: RangeSpec) -> list[RangeSpec]:
    """The range decisions ``recipe`` needs besides ``max`` (always derivable), ``primary`` first, no duplicates."""
    specs = [primary]
    default_percentile = recipe.resolved_defaults.percentile
    for settings in [recipe.defaults, *(rule.set for rule in recipe.rules)]:
        choice = settings.range
        if choice in (RangeChoice.PERCENTILE, RangeChoice.ENTROPY, RangeChoice.MSE):
            percentile = (settings.percentile or default_percentile) if choice == RangeChoice.PERCENTILE else None
            spec = RangeSpec(method=RangeMethod(choice.value), percentile=percentile)
            if all((s.method, s.percentile) != (spec.method, spec.percentile) for s in specs):
                specs.append(spec)
    return specs


def tables_for_recipe(collection: Collection, recipe: Recipe, primary: RangeSpec, *, model_name: str,
                      data_source: str) -> list[RangeTable]:
    """One RangeTable per range decision ``recipe`` needs, all from one collection pass."""
    return [range_table(collection, spec, model_name=model_name, data_source=data_source)
            for spec in required_specs(recipe, primary)]
