"""Per-output fidelity (cosine, errors, top-1, KL) against independent SciPy computations; streaming invariance."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cosine as cosine_distance
from scipy.special import rel_entr, softmax

from builder.evaluate.fidelity import FidelityAccumulator, kl_rows


def _pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = (4 * rng.standard_normal((3, 7, 50))).astype(np.float32)
    got = (ref + 0.3 * rng.standard_normal(ref.shape)).astype(np.float32)
    mask = np.ones((3, 7), dtype=np.int64)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return got, ref, mask


def test_logits_fidelity_matches_scipy() -> None:
    got, ref, mask = _pair()
    acc = FidelityAccumulator(name="logits", kind="logits")
    acc.add(got, ref, mask)
    result = acc.result()
    valid = mask.astype(bool)
    g, r = got[valid].astype(np.float64), ref[valid].astype(np.float64)
    cosines = [1.0 - cosine_distance(a, b) for a, b in zip(g, r, strict=True)]
    kl = [float(np.sum(rel_entr(softmax(b), softmax(a)))) for a, b in zip(g, r, strict=True)]
    assert result.vectors == int(valid.sum()) == 13
    assert result.cosine_mean == pytest.approx(np.mean(cosines), rel=1e-12)
    assert result.cosine_min == pytest.approx(np.min(cosines), rel=1e-12)
    assert result.relative_error == pytest.approx(np.linalg.norm(g - r) / np.linalg.norm(r), rel=1e-12)
    assert result.max_abs_error == pytest.approx(np.max(np.abs(g - r)), rel=1e-12)
    assert result.top1_agreement == pytest.approx(np.mean(g.argmax(1) == r.argmax(1)))
    assert result.kl_mean == pytest.approx(np.mean(kl), rel=1e-9)


def test_streaming_batches_equal_one_pass() -> None:
    got, ref, mask = _pair(1)
    whole = FidelityAccumulator(name="h", kind="hidden")
    whole.add(got, ref, mask)
    parts = FidelityAccumulator(name="h", kind="hidden")
    for row in range(3):
        parts.add(got[row:row + 1], ref[row:row + 1], mask[row:row + 1])
    a, b = whole.result(), parts.result()
    assert (a.vectors, a.cosine_min, a.max_abs_error, a.top1_agreement) == (b.vectors, b.cosine_min,
                                                                            b.max_abs_error, None)
    assert a.cosine_mean == pytest.approx(b.cosine_mean, rel=1e-14)
    assert a.relative_error == pytest.approx(b.relative_error, rel=1e-14)


def test_identical_outputs_are_exact_and_kl_is_zero() -> None:
    _, ref, _ = _pair(2)
    acc = FidelityAccumulator(name="logits", kind="logits")
    acc.add(ref, ref, None)  # no mask: every position (a KV-cache output's leading axes are not [batch, seq])
    result = acc.result()
    assert (result.relative_error, result.max_abs_error, result.top1_agreement) == (0.0, 0.0, 1.0)
    assert result.cosine_min == pytest.approx(1.0, abs=1e-15) and result.kl_mean == pytest.approx(0.0, abs=1e-15)
    assert np.all(kl_rows(ref.reshape(-1, 50), ref.reshape(-1, 50)) >= 0.0)
