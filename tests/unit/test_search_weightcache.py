"""The search's weight cache: a candidate lowered with cached weights is byte for byte the graph lowered without.

The toy BERT's base recipe smooths every weight GEMM's input (SmoothQuant's per-channel scales depend on the
INT8 consumers of the input, so a fallback of q_proj changes k_proj's and v_proj's float weights) and rounds the
weights with OPTQ (Hessians of the GEMM inputs collected on real calibration sentences): a cache keyed on the
GEMM alone would return stale weights here.
"""

from __future__ import annotations

from typing import Any, cast

import msgspec
import pytest

from builder.plan.artifact import QuantPlan
from builder.recipes.loader import recipe_from_yaml
from builder.search.evaluator import CandidateEvaluator
from builder.search.units import search_units
from builder.search.weightcache import WeightCache, cacheable, weight_key
from tests.unit.test_search_units import Toy, _choices, calibrated_toy

BASE = """\
version: 2
name: toy-smooth-optq
defaults: {precision: fp32}
rules:
  - select: {roles: [q_proj, k_proj, v_proj, fc1, fc2]}
    set: {precision: int8, activation: {quantizer: smooth, alpha: 0.8}, weight: {quantizer: optq, bits: 8}}
  - select: {roles: [attn_out]}
    set: {precision: int8, activation: {quantizer: static, range: max}, weight: {quantizer: optq, bits: 8}}
  - select: {roles: [attn_qk, attn_pv]}
    set: {precision: int8, activation: {quantizer: static, range: max}}
"""


@pytest.fixture(scope="module")
def toy() -> Toy:
    from builder.evaluate.tokenizer import model_text_encoder
    from builder.intake.minilm import tokenizer_json_path
    from builder.pipeline import calibrate_weight_inputs, plan_model
    from calib.data import calibration_texts

    plain = calibrated_toy(layers=2, texts=24)
    base = recipe_from_yaml(BASE, where="test")
    plan = plan_model(plain.model, plain.report, base, plain.statistics)
    encoder = model_text_encoder(plain.model, tokenizer_json_path())
    feeds = list(encoder.feeds(calibration_texts("vader", 24), 64, 8))  # the batches calibrated_toy collected on
    statistics = calibrate_weight_inputs(plain.model, plan, plain.statistics, feeds)
    return Toy(model=plain.model, report=plain.report, statistics=statistics, base=base, plan=plan)


def _evaluator(toy: Toy, weight_cache_bytes: int = 1 << 30) -> CandidateEvaluator:
    units = search_units(toy.report, toy.plan)
    none = cast(Any, None)  # the scorers are not used: only lowering is
    return CandidateEvaluator(model=toy.model, report=toy.report, statistics=toy.statistics, base=toy.base,
                              units=units, full=none, quick=none, weight_cache_bytes=weight_cache_bytes)


def _plan(toy: Toy, evaluator: CandidateEvaluator, fallback: frozenset[str]) -> QuantPlan:
    from builder.pipeline import plan_model

    return plan_model(toy.model, toy.report, evaluator.recipe(fallback), toy.statistics)


def test_cached_candidates_lower_byte_for_byte_as_uncached(toy: Toy) -> None:
    from builder.pipeline import quantize_planned

    cached, uncached = _evaluator(toy), _evaluator(toy, weight_cache_bytes=0)
    choices = _choices(cached.units, 8, seed=1)
    choices = [*choices, *choices[::-1]]  # the second pass reads back what the first stored
    for fallback in choices:
        plan = _plan(toy, cached, fallback)
        assert cacheable(plan)
        reference = quantize_planned(toy.model, plan, toy.statistics).model.model.SerializeToString()
        assert cached.lowered(plan, cached.recipe(fallback)).SerializeToString() == reference, sorted(fallback)
        assert uncached.lowered(plan, uncached.recipe(fallback)).SerializeToString() == reference
    stats = cached.cache_stats()
    gemms = len(toy.plan.weights)
    assert stats["weight_hits"] > stats["weight_misses"] > gemms  # reused, and re-quantized where the input changed
    assert uncached.cache_stats()["weight_hits"] == 0


def test_the_key_follows_the_input_edge_of_a_gemm_that_stays_int8(toy: Toy) -> None:
    evaluator = _evaluator(toy)
    q = next(u for u in evaluator.units if u.key == "layer.0.q_proj")
    before, after = _plan(toy, evaluator, frozenset()), _plan(toy, evaluator, frozenset({q.key}))

    def keys(plan: QuantPlan) -> dict[str, str]:
        edges = {a.tensor: a for a in plan.activations}
        return {w.node: weight_key(w, edges.get(w.input)) for w in plan.weights}

    k_proj = next(a.node for a in toy.report.assignments if a.layer == 0 and a.role.value == "k_proj")
    changed = {node for node, key in keys(after).items() if keys(before)[node] != key}
    assert k_proj in changed  # smoothing scales of the shared input now come from k_proj and v_proj alone
    assert all(a.layer == 0 for a in toy.report.assignments if a.node in changed)
    weight = next(w for w in before.weights if w.node == k_proj)
    edge = next(a for a in before.activations if a.tensor == weight.input)
    other_bits = msgspec.structs.replace(weight, config=msgspec.structs.replace(weight.config, bits=7))
    assert weight_key(other_bits, edge) != weight_key(weight, edge) != weight_key(weight, None)


def test_plans_whose_weights_depend_on_each_other_are_not_cached(toy: Toy) -> None:
    from builder.pipeline import plan_model

    corrected = recipe_from_yaml(BASE.replace("optq, bits: 8}}", "optq, bits: 8}, bias_correction: true}", 1),
                                 where="test")
    plan = plan_model(toy.model, toy.report, corrected, toy.statistics)
    assert plan.bias_correction_nodes and not cacheable(plan)
    assert cacheable(toy.plan)
    cache = WeightCache(toy.model, toy.statistics, max_bytes=0)
    cache.weights(toy.plan)
    assert cache.bytes == 0 and cache.misses == len(toy.plan.weights)
