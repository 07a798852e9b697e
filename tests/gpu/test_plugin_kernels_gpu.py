"""GPU correctness of the plugin kernels against the NumPy reference (compiled kernels, real hardware).

LayerNormQuantize must match bit for bit (codes and per-token scales): its float64 row sums and IEEE
division/square root make the result independent of the reduction order. SoftmaxQuantize uses the
hardware's approximate exponential, so codes may differ by one step where a value lies within an ulp of a
rounding boundary; at most 1e-4 of codes may differ, never by more than one step, never NaN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="GPU kernel tests need torch")
pytest.importorskip("triton", reason="GPU kernel tests need triton")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA"),
]


def _cuda(a: np.ndarray) -> Any:
    return torch.from_numpy(a).cuda()


@pytest.mark.parametrize("hidden", [384, 768, 1000, 1024, 4096, 16384])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("variant", ["static", "per_token_residual"])
def test_layernorm_quant_matches_reference_bit_for_bit(hidden: int, dtype: type, variant: str) -> None:
    from plugins.layernorm_quant.kernel import layernorm_quantize
    from plugins.layernorm_quant.reference import layernorm_quantize as reference

    rng = np.random.default_rng(hidden)
    rows = 257
    x = (rng.standard_normal((rows, hidden)) * 3 + 0.5).astype(dtype)
    x[3] = 1.25  # a constant row
    res = rng.standard_normal((rows, hidden)).astype(dtype) if variant != "static" else None
    gamma = (rng.random(hidden) + 0.5).astype(dtype)
    beta = (rng.standard_normal(hidden) * 0.1).astype(dtype)
    per_token = variant != "static"
    q, tok, norm = layernorm_quantize(_cuda(x), _cuda(gamma), _cuda(beta), None if res is None else _cuda(res),
                                      epsilon=1e-5, scale=0.03, per_token=per_token, emit_normalized=True)
    want_q, want_tok, want_y = reference(x, gamma, beta, res, epsilon=1e-5, scale=0.03, per_token=per_token)
    np.testing.assert_array_equal(q.cpu().numpy(), want_q)
    np.testing.assert_array_equal(norm.cpu().numpy(), want_y.astype(dtype))
    if per_token:
        np.testing.assert_array_equal(tok.cpu().numpy(), want_tok)


@pytest.mark.parametrize("shape", [(4, 12, 128, 128), (2, 4, 64, 1000), (8, 512)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_softmax_quant_within_one_step(shape: tuple[int, ...], dtype: type) -> None:
    from plugins.softmax_quant.kernel import softmax_quantize
    from plugins.softmax_quant.reference import softmax_quantize as reference

    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    mask = None
    if len(shape) == 4:
        mask = np.where(rng.random((shape[0], 1, 1, shape[-1])) < 0.2, -np.inf, 0.0).astype(dtype)
        mask[0] = -np.inf  # fully masked rows
    got = softmax_quantize(_cuda(x), None if mask is None else _cuda(mask), scale=1 / 127).cpu().numpy()
    want = reference(x, mask, scale=1 / 127)
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= 1
    assert np.mean(diff != 0) <= 1e-4
    if mask is not None:
        assert not got[0].any()
