"""Triton kernels vs the NumPy reference on the CPU (``TRITON_INTERPRET=1``), bit for bit.

TRITON_INTERPRET must be set before triton is imported, and other test modules of the same process may
import triton first, so the kernels run in one subprocess (``_run_cases``) and each case is asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
LN_CASES = [(h, dt, v) for h in (384, 768, 1000, 1024, 4096) for dt in ("float32", "float16")
            for v in ("static", "per_token_residual")]
SM_CASES = ["mask_4d_fully_masked", "mask_lower_rank", "no_mask_npot", "fp16_384", "finite_mask_min", "rank1"]


def _ln_case(hidden: int, dtype: str, variant: str) -> dict[str, Any]:
    import torch

    from plugins.layernorm_quant.kernel import layernorm_quantize
    from plugins.layernorm_quant.reference import layernorm_quantize as reference

    rng = np.random.default_rng(hidden)
    x = (rng.standard_normal((4, hidden)) * 3 + 0.5).astype(dtype)
    x[1] = 0.75  # constant row
    gamma = (rng.random(hidden) + 0.5).astype(dtype)
    beta = (rng.standard_normal(hidden) * 0.1).astype(dtype)
    per_token = variant != "static"
    res = rng.standard_normal((4, hidden)).astype(dtype) if per_token else None
    if per_token:
        res[2] = -x[2]  # a row whose sum is exactly zero: with beta it still quantizes; gamma scales it
    t = torch.from_numpy
    q, tok, norm = layernorm_quantize(t(x), t(gamma), t(beta), None if res is None else t(res), epsilon=1e-5,
                                      scale=0.03, per_token=per_token, emit_normalized=True)
    want_q, want_tok, want_y = reference(x, gamma, beta, res, epsilon=1e-5, scale=0.03, per_token=per_token)
    tok_ulp = 0
    if per_token:
        a, b = tok.numpy().view(np.int32).astype(np.int64), want_tok.view(np.int32).astype(np.int64)
        tok_ulp = int(np.max(np.abs(a - b)))
    return {"q_mismatch": int(np.sum(q.numpy() != want_q)), "tok_ulp": tok_ulp,
            "norm_mismatch": int(np.sum(norm.numpy() != want_y.astype(dtype)))}


def _sm_inputs(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    if name == "mask_4d_fully_masked":
        x = (rng.standard_normal((2, 3, 2, 128)) * 4).astype(np.float32)
        mask = np.where(rng.random((2, 1, 1, 128)) < 0.3, -np.inf, 0.0).astype(np.float32)
        mask[1] = -np.inf
        return x, mask
    if name == "mask_lower_rank":
        return (rng.standard_normal((2, 4, 96)) * 4).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    if name == "no_mask_npot":
        return (rng.standard_normal((3, 100)) * 4).astype(np.float32), None
    if name == "fp16_384":
        return (rng.standard_normal((2, 2, 384)) * 4).astype(np.float16), None
    if name == "finite_mask_min":
        x = (rng.standard_normal((1, 2, 3, 64)) * 4).astype(np.float32)
        mask = np.zeros((1, 1, 1, 64), np.float32)
        mask[..., 10:] = np.finfo(np.float32).min
        return x, mask
    return (rng.standard_normal(300) * 4).astype(np.float32), None


def _sm_case(name: str) -> dict[str, Any]:
    import torch

    from plugins.softmax_quant.kernel import softmax_quantize
    from plugins.softmax_quant.reference import softmax_quantize as reference

    x, mask = _sm_inputs(name, np.random.default_rng(len(name)))
    got = softmax_quantize(torch.from_numpy(x), None if mask is None else torch.from_numpy(mask), scale=1 / 127)
    want = reference(x, mask, scale=1 / 127)
    return {"q_mismatch": int(np.sum(got.numpy() != want)), "any_nonzero_masked": bool(
        name == "mask_4d_fully_masked" and got.numpy()[1].any()), "max_code": int(want.max())}


def _run_cases() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    out = {f"ln-{h}-{dt}-{v}": _ln_case(h, dt, v) for h, dt, v in LN_CASES}
    out.update({f"sm-{n}": _sm_case(n) for n in SM_CASES})
    print(json.dumps(out))


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    pytest.importorskip("triton", reason="kernel tests need triton")
    pytest.importorskip("torch", reason="the triton interpreter runs on torch CPU tensors")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="0")
    code = "import tests.unit.test_plugin_kernels as m; m._run_cases()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data: dict[str, dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


@pytest.mark.parametrize(("hidden", "dtype", "variant"), LN_CASES)
def test_layernorm_kernel_is_bit_exact(results: dict[str, dict[str, Any]], hidden: int, dtype: str,
                                       variant: str) -> None:
    case = results[f"ln-{hidden}-{dtype}-{variant}"]
    assert case == {"q_mismatch": 0, "tok_ulp": 0, "norm_mismatch": 0}


@pytest.mark.parametrize("name", SM_CASES)
def test_softmax_kernel_is_bit_exact(results: dict[str, dict[str, Any]], name: str) -> None:
    case = results[f"sm-{name}"]
    assert case["q_mismatch"] == 0
    assert not case["any_nonzero_masked"]
    assert case["max_code"] > 0  # the data exercise real codes, not an all-zero output
