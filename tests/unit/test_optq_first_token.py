"""OPTQ's first-token weight: the quantizer reads H = 2/n (X^T X + (w - 1) X0^T X0) from its input statistics."""

from __future__ import annotations

import numpy as np
import pytest

from builder.quant.base import WeightContext
from builder.quant.optq import OptqConfig, OptqQuantizer
from calib.errors import CalibrationError, ConfigError
from calib.hessian_observer import HessianKind
from calib.observers import FirstRows, RowsView
from calib.statistics import TensorStatistics
from calib.weights import optq


def _statistics(first: bool = True) -> tuple[TensorStatistics, np.ndarray, np.ndarray]:
    from calib.data import calibration_texts

    # real text, not random: per-token features of the first 40 calibration passages (length, vowels, spaces ...)
    texts = calibration_texts("shakespeare", 40)
    feats = np.array([[len(t), t.count("e"), t.count(" "), t.count(","), t.count("\n"), len(set(t)), t.count("a"),
                       t.count("o")] for t in texts], dtype=np.float32)
    x = np.log1p(feats).astype(np.float32)
    kind = HessianKind()
    for start in range(0, 40, 8):  # batches of 8 "texts" whose first rows are rows 0 and 4 of each batch
        part = x[start:start + 8]
        firsts = FirstRows(part[[0, 4]], np.array([start, start + 4], dtype=np.int64)) if first else None
        kind.update(RowsView(part, first_rows=firsts))
    x0 = np.concatenate([x[s:s + 8][[0, 4]] for s in range(0, 40, 8)]).astype(np.float64)
    return TensorStatistics(tensor="x", observers={"hessian": kind}), x.astype(np.float64), x0


def test_quantizer_weighs_the_first_token_rows() -> None:
    stats, x, x0 = _statistics()
    weight = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    config = OptqConfig(bits=3, first_token_weight=8.0)
    got = OptqQuantizer().quantize_kn(weight, config, WeightContext(node="g", input_statistics=stats))
    h = 2.0 / len(x) * (x.T @ x + 7.0 * (x0.T @ x0))
    expected = optq(weight, h, config.calib())
    np.testing.assert_array_equal(got.values, expected.values)
    np.testing.assert_array_equal(got.scales, expected.scales)
    plain = OptqQuantizer().quantize_kn(weight, OptqConfig(bits=3), WeightContext(node="g", input_statistics=stats))
    np.testing.assert_array_equal(plain.values, optq(weight, 2.0 / len(x) * (x.T @ x),
                                                     OptqConfig(bits=3).calib()).values)


def test_statistics_without_first_rows_are_refused_for_a_weight_other_than_one() -> None:
    stats, _, _ = _statistics(first=False)
    weight = np.ones((8, 2), dtype=np.float32)
    with pytest.raises(CalibrationError, match="first-token"):
        OptqQuantizer().quantize_kn(weight, OptqConfig(bits=4, first_token_weight=4.0),
                                    WeightContext(node="g", input_statistics=stats))


@pytest.mark.parametrize("value", [-1.0, float("nan"), 1e7, True])
def test_bad_first_token_weight_is_a_config_error(value: object) -> None:
    with pytest.raises(ConfigError, match="first_token_weight"):
        OptqConfig(bits=4, first_token_weight=value)  # type: ignore[arg-type]
