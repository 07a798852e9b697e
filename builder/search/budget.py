"""Precision search: the accuracy budget (``cosine>=0.999``, ``perplexity<=+2%``) and the metrics it may name.

Which metrics a model offers depends on what its evaluation computes (builder.evaluate): a sentence encoder
has the embedding cosine to FP32 and the VADER probe, a causal language model perplexity and next-token
agreement. The grammar is ``METRIC OP VALUE`` with the operator fixed by the metric's direction:

    cosine>=0.999        mean cosine of the sentence embeddings to FP32, in (0, 1]
    cosine-min>=0.99     the smallest of those cosines, in (-1, 1]
    probe-drop<=0.1      FP32 probe accuracy minus the model's, in percentage points (>= 0)
    perplexity<=+2%      relative increase over the FP32 perplexity; also <=+0.5 (absolute increase) or <=12.5
    top1>=0.98           next-token agreement with FP32, in [0, 1] (or 98%)

A budget is resolved against the FP32 value of its metric once (:meth:`Budget.threshold`); whether a point
meets it and how far it is from it are then plain comparisons.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum

from calib.errors import ConfigError, suggest


class ModelKind(StrEnum):
    SENTENCE = "sentence encoder"
    LANGUAGE = "causal language model"


@dataclass(frozen=True, kw_only=True)
class Metric:
    """A figure the search can hold against a budget."""

    name: str
    kind: ModelKind
    higher_is_better: bool
    description: str
    low: float  # the allowed range of an absolute value
    high: float
    relative: bool = False  # "+X%" and "+X" are read against the FP32 value

    @property
    def operator(self) -> str:
        return ">=" if self.higher_is_better else "<="


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric(name="cosine", kind=ModelKind.SENTENCE, higher_is_better=True, low=0.0, high=1.0,
           description="mean cosine of the sentence embeddings to FP32"),
    Metric(name="cosine-min", kind=ModelKind.SENTENCE, higher_is_better=True, low=-1.0, high=1.0,
           description="smallest cosine of a sentence embedding to FP32"),
    Metric(name="probe-drop", kind=ModelKind.SENTENCE, higher_is_better=False, low=0.0, high=100.0,
           description="FP32 probe accuracy minus the model's, in percentage points"),
    Metric(name="perplexity", kind=ModelKind.LANGUAGE, higher_is_better=False, low=1.0, high=math.inf,
           relative=True, description="perplexity on held-out windows (+X% or +X: against FP32)"),
    Metric(name="top1", kind=ModelKind.LANGUAGE, higher_is_better=True, low=0.0, high=1.0,
           description="next-token (top-1) agreement with FP32"),
)}

BUDGET_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_-]*)\s*(>=|<=|=>|=<|>|<|==|=)\s*(\S.*?)\s*$")
_VALUE_RE = re.compile(r"^([+-])?(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?(%)?$")


def metrics_for(kind: ModelKind) -> tuple[Metric, ...]:
    """The metrics a model of ``kind`` offers, in declaration order."""
    return tuple(m for m in METRICS.values() if m.kind == kind)


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A parsed budget: the metric, and the bound as written (absolute, or an increase over FP32)."""

    text: str
    metric: Metric
    value: float
    increase: bool = False  # "+X": the bound is the FP32 value plus X (or plus X percent with ``percent``)
    percent: bool = False

    def threshold(self, reference: float) -> float:
        """The bound on the metric, given its FP32 value ``reference``."""
        if not self.increase:
            return self.value
        return reference * (1.0 + self.value / 100.0) if self.percent else reference + self.value

    def met(self, value: float, reference: float) -> bool:
        bound = self.threshold(reference)
        return value >= bound if self.metric.higher_is_better else value <= bound

    def shortfall(self, value: float, reference: float) -> float:
        """How far ``value`` is from meeting the budget, in the metric's units (0 when met)."""
        bound = self.threshold(reference)
        gap = bound - value if self.metric.higher_is_better else value - bound
        return max(0.0, gap)

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b`` in this metric's direction."""
        return a > b if self.metric.higher_is_better else a < b

    def describe(self, reference: float | None = None) -> str:
        if reference is None or not self.increase:
            return self.text
        return f"{self.text} (bound {self.threshold(reference):.6g}, FP32 {reference:.6g})"


def _number(raw: str, text: str, metric: Metric) -> tuple[float, bool, bool]:
    match = _VALUE_RE.match(raw)
    if match is None:
        raise ConfigError(f"budget {text!r}: value {raw!r} is not a number (e.g. {_example(metric)})")
    sign, digits, exponent, percent = match.groups()
    value = float(digits) * (10.0 ** int(exponent) if exponent else 1.0)
    if sign == "-":
        value = -value
    return value, sign == "+", percent is not None


def _example(metric: Metric) -> str:
    examples = {"cosine": "cosine>=0.999", "cosine-min": "cosine-min>=0.99", "probe-drop": "probe-drop<=0.1",
                "perplexity": "perplexity<=+2%", "top1": "top1>=0.98"}
    return examples.get(metric.name, f"{metric.name}{metric.operator}VALUE")


def parse_budget(text: str, kind: ModelKind) -> Budget:
    """Parse ``METRIC OP VALUE`` for a model of ``kind``; every error names what is allowed."""
    allowed = metrics_for(kind)
    names = [m.name for m in allowed]
    listing = "; ".join(f"{_example(m)} ({m.description})" for m in allowed)
    match = BUDGET_RE.match(text)
    if match is None:
        raise ConfigError(f"budget {text!r} not understood; write METRIC>=VALUE or METRIC<=VALUE. This model "
                          f"({kind.value}) offers: {listing}")
    name, op, raw = match.groups()
    if name not in names:
        other = METRICS.get(name)
        why = (f"{name!r} needs a {other.kind.value}, and this model is a {kind.value}" if other is not None
               else f"unknown metric {name!r}{suggest(name, names)}")
        raise ConfigError(f"budget {text!r}: {why}. This model offers: {listing}")
    metric = METRICS[name]
    if op != metric.operator:
        direction = "higher" if metric.higher_is_better else "lower"
        raise ConfigError(f"budget {text!r}: {name} is better {direction}, so its budget is a bound "
                          f"{metric.operator} VALUE (e.g. {_example(metric)}), not {op!r}")
    value, increase, percent = _number(raw, text, metric)
    if increase and not metric.relative:
        raise ConfigError(f"budget {text!r}: {name} takes an absolute value, not an increase over FP32 "
                          f"(e.g. {_example(metric)})")
    if percent and not increase:
        if metric.name != "top1":
            raise ConfigError(f"budget {text!r}: a percentage is allowed only as an increase (+X%) or for top1")
        value /= 100.0
    if increase:
        if value < 0:
            raise ConfigError(f"budget {text!r}: the allowed increase must be >= 0")
    elif not metric.low <= value <= metric.high or (metric.name == "cosine" and value <= 0.0):
        raise ConfigError(f"budget {text!r}: {name} must lie in [{metric.low:g}, {metric.high:g}]"
                          f"{' (above 0)' if metric.name == 'cosine' else ''}; got {value:g}")
    return Budget(text=text.strip().replace(" ", ""), metric=metric, value=value, increase=increase,
                  percent=percent)
