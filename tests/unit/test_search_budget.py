"""The precision search's budget parser: every metric's forms, strict errors that name what is allowed."""

from __future__ import annotations

import math

import pytest

from builder.search.budget import ModelKind, parse_budget
from calib.errors import ConfigError

SENTENCE = ModelKind.SENTENCE
LANGUAGE = ModelKind.LANGUAGE


@pytest.mark.parametrize(("text", "kind", "metric", "reference", "bound"), [
    ("cosine>=0.999", SENTENCE, "cosine", 1.0, 0.999),
    (" cosine >= 0.999 ", SENTENCE, "cosine", 1.0, 0.999),
    ("cosine-min>=0.98", SENTENCE, "cosine-min", 1.0, 0.98),
    ("probe-drop<=0.1", SENTENCE, "probe-drop", 0.0, 0.1),
    ("perplexity<=+2%", LANGUAGE, "perplexity", 20.0, 20.4),
    ("perplexity<=+0.5", LANGUAGE, "perplexity", 20.0, 20.5),
    ("perplexity<=21.25", LANGUAGE, "perplexity", 20.0, 21.25),
    ("top1>=0.98", LANGUAGE, "top1", 1.0, 0.98),
    ("top1>=98%", LANGUAGE, "top1", 1.0, 0.98),
    ("top1>=9.8e-1", LANGUAGE, "top1", 1.0, 0.98),
])
def test_budgets_parse_to_their_bound(text: str, kind: ModelKind, metric: str, reference: float, bound: float) -> None:
    budget = parse_budget(text, kind)
    assert budget.metric.name == metric
    assert math.isclose(budget.threshold(reference), bound, rel_tol=1e-12)
    assert budget.text == text.replace(" ", "")


def test_met_and_shortfall_follow_the_metric_direction() -> None:
    cosine = parse_budget("cosine>=0.999", SENTENCE)
    assert cosine.met(0.999, 1.0) and cosine.met(0.9995, 1.0) and not cosine.met(0.9985, 1.0)
    assert cosine.shortfall(0.9985, 1.0) == pytest.approx(0.0005, abs=1e-15)
    assert cosine.shortfall(0.9995, 1.0) == 0.0
    ppl = parse_budget("perplexity<=+2%", LANGUAGE)
    assert ppl.met(10.2, 10.0) and not ppl.met(10.3, 10.0)
    assert ppl.shortfall(10.3, 10.0) == pytest.approx(0.1, abs=1e-12)
    assert ppl.better(10.1, 10.2) and not ppl.better(10.2, 10.1)


@pytest.mark.parametrize(("text", "kind", "needle"), [
    ("perplexity<=+2%", SENTENCE, "needs a causal language model"),
    ("cosine>=0.999", LANGUAGE, "needs a sentence encoder"),
    ("cosin>=0.999", SENTENCE, "did you mean 'cosine'"),
    ("accuracy>=0.9", SENTENCE, "unknown metric 'accuracy'"),
    ("cosine<=0.999", SENTENCE, "bound >= VALUE"),
    ("cosine>0.999", SENTENCE, "bound >= VALUE"),
    ("perplexity>=+2%", LANGUAGE, "bound <= VALUE"),
    ("cosine>=1.5", SENTENCE, "must lie in [0, 1]"),
    ("cosine>=0", SENTENCE, "above 0"),
    ("top1>=1.2", LANGUAGE, "must lie in [0, 1]"),
    ("probe-drop<=-1", SENTENCE, "must lie in [0, 100]"),
    ("cosine>=+0.001", SENTENCE, "takes an absolute value"),
    ("perplexity<=-2%", LANGUAGE, "percentage is allowed only"),
    ("cosine>=high", SENTENCE, "is not a number"),
    ("cosine", SENTENCE, "not understood"),
    ("", LANGUAGE, "not understood"),
])
def test_bad_budgets_name_what_is_allowed(text: str, kind: ModelKind, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_budget(text, kind)
    message = str(info.value)
    assert needle in message, message
    offered = ("cosine>=0.999", "probe-drop<=0.1") if kind == SENTENCE else ("perplexity<=+2%", "top1>=0.98")
    if "not understood" in message or "needs a" in message or "unknown metric" in message:
        assert all(example in message for example in offered), message
