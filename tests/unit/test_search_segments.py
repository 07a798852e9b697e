"""Segmented evaluation: the chain computes what the whole graph computes, and a cached prefix changes nothing."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx
import pytest

from builder.evaluate.runner import with_outputs
from builder.search.evaluator import stream_cuts
from builder.search.segments import StateCache, run_chain, split_model
from tests.unit.test_search_units import Toy, calibrated_toy


@pytest.fixture(scope="module")
def toy() -> Toy:
    return calibrated_toy(layers=3)


def _feeds(texts: int = 12, batch: int = 4) -> list[dict[str, np.ndarray]]:
    from builder.intake.minilm import tokenizer_json_path
    from calib.data import vader_splits
    from calib.tokenize import encode

    sentences = [s.text for s in vader_splits(seed=0).train[:texts]]
    return list(encode(sentences, tokenizer_json_path(), max_length=32, batch_size=batch))


def _lowered(toy: Toy, fallback: set[str]) -> onnx.ModelProto:
    from builder.pipeline import plan_model, quantize_planned
    from builder.recipes.model import Precision
    from builder.search.units import search_recipe, search_units

    units = search_units(toy.report, toy.plan)
    recipe = search_recipe(toy.base, toy.report, units, fallback, Precision.FP16, "cosine>=0.999")
    return quantize_planned(toy.model, plan_model(toy.model, toy.report, recipe, toy.statistics), toy.statistics
                            ).model.model


def _session(model: onnx.ModelProto) -> Any:
    """ONNX Runtime without graph optimizations: each node computed on its own, so a cut cannot change fusions."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_the_cuts_are_the_residual_stream(toy: Toy) -> None:
    cuts = stream_cuts(toy.report)
    assert len(cuts) == 2 * 3
    lowered = _lowered(toy, set())
    produced = {o: n.op_type for n in lowered.graph.node for o in n.output}
    assert all(produced[c] == "Add" for c in cuts)  # lowering keeps the residual sums by name
    segments = split_model(lowered, cuts, ["last_hidden_state"])
    assert len(segments) == len(cuts) + 1
    assert sum(len(s.nodes) for s in segments) <= len(lowered.graph.node)
    for before, after in itertools.pairwise(segments):
        assert {r.name for r in after.reads} <= before.live | {i.name for i in lowered.graph.input}


def test_the_chain_computes_exactly_what_the_whole_graph_computes(toy: Toy) -> None:
    lowered = _lowered(toy, {"layer.1.fc2"})
    cuts = stream_cuts(toy.report)
    names = [*cuts, "last_hidden_state"]
    whole = _session(with_outputs(lowered, cuts))
    segments = split_model(lowered, cuts, ["last_hidden_state"])
    sessions = [_session(s.model()) for s in segments]
    for feed in _feeds():
        expected = dict(zip(names, whole.run(names, {i.name: feed[i.name] for i in whole.get_inputs()}),
                            strict=True))
        state: dict[str, np.ndarray] = {}
        for segment, session in zip(segments, sessions, strict=True):
            inputs = {t: state[t] if t in state else feed[t] for t in segment.read_names}
            state.update(zip(segment.write_names, session.run(list(segment.write_names), inputs), strict=True))
        for name in names:
            np.testing.assert_array_equal(state[name], expected[name], err_msg=name)


def test_a_cached_prefix_gives_bit_identical_outputs_and_skips_blocks(toy: Toy) -> None:
    cuts = stream_cuts(toy.report)
    feeds = _feeds()
    first, changed = _lowered(toy, {"layer.2.fc1"}), _lowered(toy, {"layer.2.fc2"})
    cache = StateCache(max_bytes=1 << 28)
    run_chain(split_model(first, cuts, ["last_hidden_state"]), feeds, cache)
    reused = run_chain(split_model(changed, cuts, ["last_hidden_state"]), feeds, cache)
    fresh = run_chain(split_model(changed, cuts, ["last_hidden_state"]), feeds, StateCache(max_bytes=0))
    assert fresh.segments_run == fresh.segments_total == len(cuts) + 1
    assert reused.segments_run == 2  # layer 2 from its attention residual sum to the FFN residual sum, and the tail
    for a, b in zip(reused.outputs, fresh.outputs, strict=True):
        np.testing.assert_array_equal(a["last_hidden_state"], b["last_hidden_state"])
    again = run_chain(split_model(changed, cuts, ["last_hidden_state"]), feeds, cache)
    assert again.segments_run == 0 and cache.hits == 2


def test_the_chain_of_a_float_model_matches_onnx_runtime(toy: Toy) -> None:
    from builder.evaluate.runner import OrtRunner

    feeds = _feeds()
    chain = run_chain(split_model(toy.model, stream_cuts(toy.report), ["last_hidden_state"]), feeds,
                      StateCache(max_bytes=0))
    runner = OrtRunner(toy.model)
    for feed, out in zip(feeds, chain.outputs, strict=True):
        (expected,) = runner.run(feed, ["last_hidden_state"])
        np.testing.assert_allclose(out["last_hidden_state"], expected, rtol=0, atol=1e-5)


def test_the_state_cache_evicts_the_least_recently_used() -> None:
    cache = StateCache(max_bytes=3 * 400)
    block = [{"x": np.zeros(100, dtype=np.float32)}]  # 400 bytes
    for key in "abc":
        cache.put(key, block)
    assert cache.get("a") is not None  # now b is the oldest
    cache.put("d", block)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("d") is not None
    assert cache.bytes == 1200
    cache.put("huge", [{"x": np.zeros(1000, dtype=np.float32)}])  # larger than the whole budget: not kept
    assert cache.get("huge") is None and cache.bytes == 1200
    cache.touch(["c", "a"])  # c was the oldest; a reused prefix keeps its shallower states
    cache.put("e", block)
    assert cache.get("d") is None and cache.get("c") is not None
