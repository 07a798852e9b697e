"""The ``hessian`` observer kind and the second calibration pass that adds it (builder.weights.hessians).

A toy BERT calibrated on real VADER sentences: the Hessian equals 2/n X^T X of the GEMM input's rows taken
independently; shards merge bit for bit; the second pass joined to the first equals one pass that collected
every kind (Statistics bytes); an interrupted second pass resumes to the same bytes; other data is refused
before the pass; mask sentinels are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from builder.graph.analyze import analyze
from builder.graph.report import GraphReport
from builder.pipeline import calibrate, calibration_tensors
from builder.weights.hessians import add_observers, collect_missing
from calib.collect import CollectOptions, collect
from calib.errors import CalibrationError, ConfigError
from calib.hessian_observer import HessianKind
from calib.observers import RowsView
from calib.statistics import Statistics
from tests.toygraphs import bert_block_model

Feed = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def toy() -> tuple[onnx.ModelProto, GraphReport, list[Feed], list[str]]:
    from builder.intake.minilm import tokenizer_json_path
    from calib.data import vader_splits
    from calib.tokenize import encode

    model = bert_block_model(layers=1, hidden=32, heads=2, ffn=64)
    report = analyze(model, name="toy_bert")
    texts = [s.text for s in vader_splits().calibration[:24]]
    feeds = [{k: v for k, v in f.items() if k in ("input_ids", "attention_mask")}
             for f in encode(texts, tokenizer_json_path(), max_length=32, batch_size=6)]
    gemm_inputs = sorted({a.inputs[0] for a in report.assignments if a.weight is not None})
    return model, report, feeds, gemm_inputs


def _wanted(inputs: list[str]) -> dict[str, tuple[str, ...]]:
    return {t: ("hessian",) for t in inputs}


def test_hessian_kind_is_2_over_n_gram_and_refuses_mask_sentinels() -> None:
    from calib.data import vader_splits

    lengths = np.array([len(s.text) for s in vader_splits().calibration[:60]], dtype=np.float32)
    rows = np.stack([lengths, np.sqrt(lengths), np.log1p(lengths)], axis=1).astype(np.float32)  # real, not random
    kind = HessianKind()
    for part in np.array_split(rows, 3):
        kind.update(RowsView(part))
    x = rows.astype(np.float64)
    np.testing.assert_allclose(kind.matrix(), 2.0 / len(x) * (x.T @ x), rtol=1e-13)
    assert kind.count == 60 and kind.features == 3
    again = HessianKind.from_state(kind.state())
    np.testing.assert_array_equal(again.matrix(), kind.matrix())
    empty = HessianKind()
    assert empty.state() == {} and empty.merge(again).count == 60 and again.count == 60
    with pytest.raises(CalibrationError, match="sentinels"):
        kind.update(RowsView(rows, sentinel=np.zeros(rows.shape, dtype=bool)))


def _one_pass(toy: Any, extra: bool) -> Statistics:
    model, report, feeds, inputs = toy
    options = CollectOptions(extra_kinds=_wanted(inputs) if extra else {})
    return collect(model, feeds, calibration_tensors(model, report), options).statistics


def test_second_pass_joined_equals_one_pass_of_every_kind(toy: Any) -> None:
    model, _, feeds, inputs = toy
    first = _one_pass(toy, extra=False)
    joined = collect_missing(model, first, _wanted(inputs), feeds)
    assert "hessian" not in first.get(inputs[0]).observers  # the first Statistics are not changed
    assert joined.state_bytes() == _one_pass(toy, extra=True).state_bytes()


def test_hessian_shards_merge_bit_for_bit(toy: Any) -> None:
    model, _, feeds, inputs = toy
    whole = collect(model, feeds, inputs, CollectOptions(kinds=(), extra_kinds=_wanted(inputs))).statistics
    a = collect(model, feeds[:2], inputs, CollectOptions(kinds=(), extra_kinds=_wanted(inputs))).statistics
    b = collect(model, feeds[2:], inputs, CollectOptions(kinds=(), extra_kinds=_wanted(inputs),
                                                         batch_offset=2)).statistics
    assert b.merge(a).state_bytes() == whole.state_bytes()


def test_an_interrupted_second_pass_resumes_to_the_same_bytes(toy: Any, tmp_path: Path) -> None:
    model, _, feeds, inputs = toy
    first = _one_pass(toy, extra=False)
    checkpoint = tmp_path / "hessians.npz"

    def stopping() -> Iterator[Feed]:
        for index, feed in enumerate(feeds):
            if index == 3:
                raise KeyboardInterrupt
            yield feed

    options = CollectOptions(checkpoint=checkpoint, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        collect(model, stopping(), inputs, CollectOptions(kinds=(), extra_kinds=_wanted(inputs),
                                                          checkpoint=checkpoint, checkpoint_every=1))
    assert not Statistics.load(checkpoint).meta.complete
    resumed = collect_missing(model, first, _wanted(inputs), feeds, options)
    assert Statistics.load(checkpoint).meta.complete
    assert resumed.state_bytes() == collect_missing(model, first, _wanted(inputs), feeds).state_bytes()


def test_other_data_is_refused_before_the_pass(toy: Any, tmp_path: Path) -> None:
    model, _, feeds, inputs = toy
    first = _one_pass(toy, extra=False)
    checkpoint = tmp_path / "hessians.npz"
    with pytest.raises(ConfigError, match="not the data the statistics were collected on"):
        collect_missing(model, first, _wanted(inputs), feeds[1:], CollectOptions(checkpoint=checkpoint))
    assert not checkpoint.exists()


def test_add_observers_refuses_another_model_and_a_kind_twice(toy: Any) -> None:
    model, report, feeds, inputs = toy
    first = _one_pass(toy, extra=False)
    other = bert_block_model(layers=1, hidden=32, heads=2, ffn=64, seed=1)
    extra = collect(other, feeds, inputs, CollectOptions(kinds=(), extra_kinds=_wanted(inputs))).statistics
    with pytest.raises(CalibrationError, match="another model"):
        add_observers(first, extra)
    with pytest.raises(CalibrationError, match="already has"):
        add_observers(first, calibrate(model, report, feeds).statistics.subset(inputs))


def test_first_token_rows_are_the_inputs_at_each_texts_first_position(toy: Any) -> None:
    import onnxruntime as ort

    from calib.fold import SAMPLES_PER_BATCH_ID

    model, _, feeds, inputs = toy
    tensor = inputs[0]
    stats = collect(model, feeds, [tensor], CollectOptions(kinds=(), extra_kinds=_wanted([tensor]))).statistics
    observer = stats.get(tensor).observers["hessian"].observer
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    rows, ids = [], []
    for index, feed in enumerate(feeds):
        (x,) = session.run([tensor], feed)
        for b in range(x.shape[0]):  # right padding: every text starts at position 0
            rows.append(x[b, 0])
            ids.append(index * SAMPLES_PER_BATCH_ID + b)
    np.testing.assert_array_equal(observer.first_ids, np.array(ids))
    np.testing.assert_array_equal(observer.first_rows, np.stack(rows))
    x0 = np.stack(rows).astype(np.float64)
    plain = observer.matrix()
    np.testing.assert_allclose(observer.matrix(9.0), plain + 8.0 * 2.0 / observer.count * (x0.T @ x0), rtol=1e-12)
