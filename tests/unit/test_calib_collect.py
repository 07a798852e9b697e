"""The collector on toy graphs built in code: padding exclusion, bad input, non-finite values, resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from calib.collect import CollectOptions, collect
from calib.errors import CalibrationError, ConfigError
from calib.range_table import RangeMethod, RangeTable
from calib.ranges import RangeSpec, range_table, tensor_range
from calib.statistics import Statistics, TensorStatistics
from tests.toygraphs import bert_block_model, toy_roles


def _outputs_of(model: onnx.ModelProto, role: str) -> list[str]:
    roles = toy_roles(model)
    return [o for n in model.graph.node if roles.get(n.name, ("",))[0] == role for o in n.output]


@pytest.fixture(scope="module")
def bert() -> onnx.ModelProto:
    return bert_block_model(layers=2, hidden=32, heads=2, ffn=64)


def _feeds(batches: int = 3, batch: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        lengths = rng.integers(3, 12, size=batch)
        seq = int(lengths.max())
        ids = np.zeros((batch, seq), dtype=np.int64)
        mask = np.zeros((batch, seq), dtype=np.int64)
        for row, n in enumerate(lengths):
            ids[row, :n] = rng.integers(1000, 2000, size=n)
            mask[row, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _raw_outputs(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, feed)


def test_padding_is_excluded_exactly(bert: onnx.ModelProto) -> None:
    ln_out = _outputs_of(bert, "attn_ln")[0]  # [B, S, D]
    probs = _outputs_of(bert, "attn_softmax")[0]  # [B, H, S, S]
    scores = next(n.input[0] for n in bert.graph.node if n.output[0] == probs)  # carries the -10000 mask
    feeds = _feeds()
    result = collect(bert, feeds, [ln_out, scores, probs]).statistics
    for name in (ln_out, scores):
        lo, hi = np.inf, -np.inf
        dim_lo = np.full(32, np.inf)
        for feed in feeds:
            (value,) = _raw_outputs(bert, [name], feed)
            mask = feed["attention_mask"]
            for b in range(mask.shape[0]):
                for s in range(mask.shape[1]):
                    if not mask[b, s]:
                        continue
                    if name == ln_out:
                        row = value[b, s]
                        dim_lo = np.minimum(dim_lo, row)
                    else:  # query s, keys k with mask[b, k]
                        row = value[b, :, s, :][:, mask[b].astype(bool)]
                    lo, hi = min(lo, float(row.min())), max(hi, float(row.max()))
        stats = result.tensors[name]
        assert (stats.minmax.minimum, stats.minmax.maximum) == (lo, hi)
        if name == ln_out:
            assert stats.dims is not None and stats.dims.dim_min is not None
            np.testing.assert_array_equal(stats.dims.dim_min, dim_lo)
    assert result.tensors[scores].minmax.minimum > -1000  # the -10000 of padded keys never entered
    assert result.tensors[scores].dims is None  # last axis is a token axis: no per-dim statistics
    assert result.meta.layouts[probs].token_axes == (2, -1)
    assert result.batches == 3 and result.samples == 12


def test_token_statistics_follow_input_ids(bert: onnx.ModelProto) -> None:
    ln_out = _outputs_of(bert, "ffn_ln")[-1]
    feeds = _feeds(batches=2)
    stats = collect(bert, feeds, [ln_out]).statistics.tensors[ln_out]
    assert stats.tokens is not None
    ids = np.concatenate([f["input_ids"][f["attention_mask"].astype(bool)] for f in feeds])
    np.testing.assert_array_equal(stats.tokens.token_ids, np.unique(ids))
    assert int(stats.tokens.counts.sum()) == ids.size


def test_feeds_that_do_not_match_the_model_name_the_expected_inputs(bert: onnx.ModelProto) -> None:
    tensor = _outputs_of(bert, "attn_ln")[0]
    good = _feeds(batches=1)[0]
    bad_name = {"input_id": good["input_ids"], "attention_mask": good["attention_mask"]}
    with pytest.raises(CalibrationError, match=r"missing \['input_ids'\].*did you mean 'input_ids'.*Expected inputs: "
                                               r"input_ids int64"):
        collect(bert, [bad_name], [tensor])
    bad_dtype = {"input_ids": good["input_ids"].astype(np.int32), "attention_mask": good["attention_mask"]}
    with pytest.raises(CalibrationError, match="'input_ids' has dtype int32, expected int64"):
        collect(bert, [bad_dtype], [tensor])
    bad_rank = {"input_ids": good["input_ids"][0], "attention_mask": good["attention_mask"]}
    with pytest.raises(CalibrationError, match="expected rank 2"):
        collect(bert, [bad_rank], [tensor])


def test_empty_data_and_unknown_tensors_are_errors(bert: onnx.ModelProto) -> None:
    tensor = _outputs_of(bert, "attn_ln")[0]
    with pytest.raises(CalibrationError, match="empty"):
        collect(bert, [], [tensor])
    with pytest.raises(ConfigError, match="not produced by the model; did you mean"):
        collect(bert, _feeds(1), [tensor + "x"])
    with pytest.raises(ConfigError, match="only floating-point"):
        collect(bert, _feeds(1), ["attention_mask"])


def _unary_model(op: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["act"]), helper.make_node("Identity", ["act"], ["y"])],
                              "unary", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("op", "value", "what"), [("Sqrt", -1.0, "1 NaN"), ("Reciprocal", 0.0, "1 \\+inf")])
def test_nan_or_inf_activation_names_the_tensor(op: str, value: float, what: str) -> None:
    feed = {"x": np.array([[1.0, 2.0, 3.0, value]], dtype=np.float32)}
    with pytest.raises(CalibrationError, match=f"tensor 'act' has .*{what}.*batch 0"):
        collect(_unary_model(op), [feed], ["act"])


def test_minus_inf_mask_values_are_excluded_or_rejected() -> None:
    feed = {"x": np.array([[1.0, 2.0, 0.0, 4.0]], dtype=np.float32)}  # Log(0) = -inf, as an additive mask
    stats = collect(_unary_model("Log"), [feed], ["act"]).statistics.tensors["act"]
    assert stats.mask_values == 1 and stats.minmax.minimum == 0.0 and stats.minmax.count == 3
    with pytest.raises(CalibrationError, match="tensor 'act' has 1 values <= -1e\\+30"):
        collect(_unary_model("Log"), [feed], ["act"], CollectOptions(allow_mask_values=False))


def _assert_same_stats(a: TensorStatistics, b: TensorStatistics) -> None:
    assert set(a.state()) == set(b.state())
    for key, value in a.state().items():
        np.testing.assert_array_equal(value, b.state()[key], err_msg=key)


def test_interrupted_run_resumes_from_the_checkpoint(bert: onnx.ModelProto, tmp_path: Path) -> None:
    tensors = _outputs_of(bert, "attn_ln") + _outputs_of(bert, "attn_softmax")
    feeds = _feeds(batches=5)
    checkpoint = tmp_path / "ckpt.npz"
    options = CollectOptions(checkpoint=checkpoint, checkpoint_every=2)

    def interrupted() -> Iterator[dict[str, np.ndarray]]:
        yield from feeds[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(bert, interrupted(), tensors, options)
    assert checkpoint.is_file()
    seen: list[int] = []
    resumed = collect(bert, feeds, tensors, CollectOptions(checkpoint=checkpoint, checkpoint_every=2,
                                                           progress=lambda b, s: seen.append(b)))
    assert resumed.resumed_batches == 3 and resumed.statistics.batches == 5
    assert seen == [4, 5]  # only the two missing batches ran
    fresh = collect(bert, feeds, tensors).statistics
    assert resumed.statistics.state_bytes() == fresh.state_bytes()
    for name in tensors:
        _assert_same_stats(resumed.statistics.tensors[name], fresh.tensors[name])
    with pytest.raises(CalibrationError, match="differs from the data"):
        collect(bert, _feeds(batches=5, seed=9), tensors, CollectOptions(checkpoint=checkpoint))


def test_shards_collected_apart_merge_into_the_one_pass_statistics(bert: onnx.ModelProto) -> None:
    tensors = _outputs_of(bert, "attn_ln") + _outputs_of(bert, "attn_softmax") + _outputs_of(bert, "ffn_residual")
    feeds = _feeds(batches=5)
    one = collect(bert, feeds, tensors).statistics
    shards = [collect(bert, feeds[a:b], tensors, CollectOptions(batch_offset=a)).statistics
              for a, b in ((3, 5), (0, 2), (2, 3))]
    merged = shards[0].merge(shards[1]).merge(shards[2])
    assert merged.state_bytes() == one.state_bytes()
    assert Statistics.load is not None and merged.meta == one.meta


def test_one_statistics_gives_a_range_table_for_every_method(bert: onnx.ModelProto) -> None:
    tensors = _outputs_of(bert, "attn_ln") + _outputs_of(bert, "ffn_residual")
    feeds = _feeds(batches=3)
    statistics = collect(bert, feeds, tensors, CollectOptions(data_source="toy")).statistics
    table = range_table(statistics, RangeSpec(method=RangeMethod.ENTROPY), model_name="toy")
    assert RangeTable.from_json(table.to_json()) == table
    assert table.data_source == "toy" and table.num_samples == 12 and set(table) == set(tensors)
    specs = [RangeSpec(method=RangeMethod.MAX), RangeSpec(method=RangeMethod.PERCENTILE, percentile=99.9),
             RangeSpec(method=RangeMethod.ENTROPY), RangeSpec(method=RangeMethod.MSE)]
    for name in tensors:
        stats = statistics.tensors[name]
        assert tensor_range(stats, specs[2]) == table.get(name)
        rng = tensor_range(stats, specs[0])
        assert rng.amax == max(-rng.observed_min, rng.observed_max)
        assert rng.channel_amax is not None and max(rng.channel_amax) == rng.amax
        for spec in specs:
            assert 0 < tensor_range(stats, spec).amax <= rng.amax * (1 + 1e-6)
    with pytest.raises(ConfigError, match="needs a percentile"):
        RangeSpec(method=RangeMethod.PERCENTILE)
