"""Ahead-of-time compilation to PTX and cubin for every supported architecture, on a machine without a GPU."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from calib.errors import ConfigError, GraphError

pytest.importorskip("triton", reason="AOT compilation needs triton")

from plugins.aot import MIN_PTX_ISA, SUPPORTED_ARCHS, compile_layernorm_quant, compile_softmax_quant


def _params(ptx: str) -> list[str]:
    return re.findall(r"\.param\s+\.(u64|u32|b32|b64|f32)\b", ptx)


def _ptxas_accepts(ptx: str, arch: int, tmp_path: Path) -> None:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = Path(get_ptxas(arch).path)  # the ptxas triton itself uses for this arch
    src = tmp_path / f"k{arch}.ptx"
    src.write_text(ptx)
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    proc = subprocess.run([str(ptxas), f"-arch={target}", str(src), "-o", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_layernorm_ptx_for_every_arch_has_the_tensorrt_abi(arch: int, tmp_path: Path) -> None:
    k = compile_layernorm_quant(dtype="float16", hidden=768, epsilon=1e-12, scale=0.05, has_residual=True,
                                emit_normalized=True, arch=arch)
    assert re.search(rf"^\.target sm_{arch}a?\b", k.ptx, re.MULTILINE)
    # x, gamma, beta, residual, n_rows, hidden, q, normalized: no trailing scratch pointers
    assert _params(k.ptx) == ["u64"] * 4 + ["u32"] * 2 + ["u64"] * 2
    assert k.cubin and k.threads_per_block == k.num_warps * 32
    assert "fma.rn.f32" not in k.ptx  # no contraction: the kernel's arithmetic is the reference's
    _ptxas_accepts(k.ptx, arch, tmp_path)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_softmax_ptx_for_every_arch_has_the_tensorrt_abi(arch: int, tmp_path: Path) -> None:
    k = compile_softmax_quant(dtype="float32", n_cols=128, scale=1 / 127, has_mask=True, arch=arch)
    assert re.search(rf"^\.target sm_{arch}a?\b", k.ptx, re.MULTILINE)
    assert _params(k.ptx) == ["u64"] * 2 + ["u32"] * 8 + ["u64"]
    _ptxas_accepts(k.ptx, arch, tmp_path)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_ptx_isa_is_the_oldest_the_driver_must_support(arch: int, tmp_path: Path) -> None:
    """An explicit ISA (what plugin.py asks for from the driver's CUDA version) is written into the PTX, and
    the oldest ISA that can name the target still assembles: a driver of that age can load it."""
    isa = MIN_PTX_ISA[arch]
    k = compile_softmax_quant(dtype="float16", n_cols=100, scale=1 / 127, arch=arch, ptx_isa=isa, exact_width=False)
    assert re.search(rf"^\.version {isa // 10}\.{isa % 10}$", k.ptx, re.MULTILINE)
    _ptxas_accepts(k.ptx, arch, tmp_path)


def test_bad_requests_fail_before_compiling() -> None:
    with pytest.raises(ConfigError, match="sm_70"):
        compile_softmax_quant(dtype="float16", n_cols=128, scale=0.01, arch=70)
    with pytest.raises(ConfigError, match="PTX ISA 78 cannot name sm_90"):
        compile_softmax_quant(dtype="float16", n_cols=128, scale=0.01, arch=90, ptx_isa=78)
    with pytest.raises(ConfigError, match="bfloat16"):
        compile_softmax_quant(dtype="bfloat16", n_cols=128, scale=0.01)
    with pytest.raises(GraphError, match=r"1\.\.16384"):
        compile_layernorm_quant(dtype="float16", hidden=20000, epsilon=1e-5)
    with pytest.raises(GraphError, match="epsilon"):
        compile_layernorm_quant(dtype="float16", hidden=768, epsilon=0.0)
