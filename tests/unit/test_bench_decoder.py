"""The decoder benchmark's acceptance logic (bench/decoder.py) and its alpha override, without running SmolLM2."""

from __future__ import annotations

import pytest

from bench.decoder import PPL_BUDGET, _with_alpha, verdict
from builder.evaluate.report import AccuracyReport, LanguageFigures
from builder.quant.smooth import SmoothConfig
from builder.recipes.loader import load_preset


def _report(name: str, perplexity: float, share: float, reference: float = 20.0) -> AccuracyReport:
    language = LanguageFigures(corpus="text", window=8, windows=1, tokens=7, perplexity=perplexity,
                               reference_perplexity=reference, top1_agreement=0.9, kl_mean=0.01)
    return AccuracyReport(model_name=name, computed=("perplexity",), language=language, int8_gemm_share=share)


def test_the_best_eligible_preset_passes_within_budget_and_is_compared_with_every_peer() -> None:
    reports = {"a": _report("a", 20.5, 0.76), "b": _report("b", 20.1, 0.60),
               "ort-matmul": _report("ort-matmul", 90.0, 1.0), "modelopt-max": _report("modelopt-max", 20.3, 1.0)}
    lines = verdict(reports, ["a", "b"])
    assert lines[0].startswith("best preset with >= 75% INT8 MACs: a ") and "PASS" in lines[0]  # b has too few MACs
    assert "a vs ort-matmul: 20.500 vs 90.000: better" in lines
    assert "a vs modelopt-max: 20.500 vs 20.300: NOT better" in lines


def test_a_preset_over_budget_fails_and_no_eligible_preset_fails() -> None:
    over = 20.0 * (1 + PPL_BUDGET) + 0.01
    assert "FAIL" in verdict({"a": _report("a", over, 0.8)}, ["a"])[0]
    assert verdict({"a": _report("a", 20.0, 0.5)}, ["a"])[0].startswith("FAIL")


@pytest.mark.parametrize("preset", ["smooth-w8a8", "int8-all-linear"])
def test_alpha_override_reaches_every_smooth_rule_and_nothing_else(preset: str) -> None:
    recipe = load_preset(preset)
    changed = _with_alpha(recipe, 0.65)
    before = [r.set.activation for r in recipe.rules]
    after = [r.set.activation for r in changed.rules]
    assert any(isinstance(a, SmoothConfig) for a in before)
    for old, new in zip(before, after, strict=True):
        if isinstance(old, SmoothConfig):
            assert isinstance(new, SmoothConfig) and new.alpha == 0.65 and new.clip == old.clip
        else:
            assert new == old


def test_sparq_rows_are_compared_with_their_own_plain_4bit_baseline() -> None:
    from bench.decoder import sparq_kinds, sparq_verdict

    reports = {"sparq-b4": _report("sparq-b4", 300.0, 0.5), "a4-p99": _report("a4-p99", 900.0, 0.5),
               "smooth-sparq-v4": _report("smooth-sparq-v4", 40.0, 0.9),
               "smooth-a4-c0.5-p99": _report("smooth-a4-c0.5-p99", 35.0, 0.9)}
    lines = sparq_verdict(reports, ["sparq-b4", "smooth-sparq-v4", "smooth-w8a8"])
    assert lines == ["sparq-b4 vs plain 4-bit a4-p99: perplexity 300.000 vs 900.000: better",
                     "smooth-sparq-v4 vs plain 4-bit smooth-a4-c0.5-p99: perplexity 40.000 vs 35.000: NOT better"]
    assert sparq_kinds(["smooth-w8a8"]) == (False, False)
    assert sparq_kinds(["sparq-v4", "smooth-sparq-b4"]) == (True, True)


@pytest.mark.parametrize("smoothed", [False, True])
def test_plain_4bit_baselines_replace_every_sparq_input_and_keep_the_rest(smoothed: bool) -> None:
    from bench.decoder import A4_CLIPS, _a4_ranges, a4_candidates
    from builder.quant.lowbit import LowBitConfig
    from builder.quant.sparq import SparqQuantConfig

    source = load_preset("smooth-sparq-b4" if smoothed else "sparq-b4")
    candidates = a4_candidates(smoothed, _a4_ranges()[-1])
    assert len(candidates) == (len(A4_CLIPS) if smoothed else len(_a4_ranges()))
    assert len({name for name, _ in candidates}) == len(candidates)
    for name, recipe in candidates:
        assert recipe.name == name
        for old, new in zip(source.rules, recipe.rules, strict=True):
            assert new.select == old.select and new.set.precision == old.set.precision
            act = old.set.activation
            if isinstance(act, SparqQuantConfig):
                assert isinstance(new.set.activation, LowBitConfig) and new.set.activation.bits == 4
            elif isinstance(act, SmoothConfig):
                got = new.set.activation
                assert isinstance(got, SmoothConfig) and got.sparq is None and got.bits == 4
                assert got.alpha == act.alpha and f"-c{got.clip:g}-" in name
            else:
                assert new.set == old.set
