"""SparqQuantize plugin: node schema, the Triton kernel bit for bit against the reference on the CPU interpreter,
ahead-of-time PTX for every architecture, and the registration run through NVIDIA's own ``tensorrt.plugin``.

TRITON_INTERPRET must be set before triton is imported and other test modules may import triton first, so the
kernel cases run in one subprocess (``_run_cases``) and each case is asserted here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from calib.errors import ConfigError, GraphError
from calib.sparq import Rounding, SparqConfig, allowed_placements
from plugins.sparq_quant.schema import DOMAIN, OP_TYPE, SparqQuantizeAttrs

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [SparqConfig(window_bits=n, placements=p, rounding=r, vsparq=v)
           for n in range(2, 8) for p in allowed_placements(n) for r in Rounding for v in (False, True)]
SHAPES = {"rows-odd": ((3, 37), "float32"), "bsk-384": ((2, 5, 384), "float32"), "fp16-1536": ((2, 1536), "float16"),
          "single": ((1,), "float32")}


def _inputs(shape: tuple[int, ...], dtype: str, seed: int) -> tuple[np.ndarray, float]:
    """Laplace-distributed activations (GEMM inputs are heavy-tailed) with exact zeros, saturating values and
    exact ties (x / scale = k + 1/2), so every branch of the kernel is reached."""
    rng = np.random.default_rng(seed)
    scale = 0.02
    x = rng.laplace(scale=0.4, size=shape)
    x[rng.random(shape) < 0.3] = 0.0
    flat = x.reshape(-1)
    flat[: min(6, flat.size)] = [5.0, -5.0, 127.5 * scale, -128.5 * scale, 44.5 * scale, -0.0][: min(6, flat.size)]
    return x.astype(dtype), scale


def _run_cases() -> None:
    import torch

    from plugins.sparq_quant.kernel import sparq_quantize
    from plugins.sparq_quant.reference import sparq_quantize as reference

    assert os.environ.get("TRITON_INTERPRET") == "1"
    out: dict[str, Any] = {}
    for name, (shape, dtype) in SHAPES.items():
        x, scale = _inputs(shape, dtype, seed=len(name))
        mismatches, changed = 0, 0
        for config in CONFIGS:
            got = sparq_quantize(torch.from_numpy(x), scale=scale, config=config).numpy()
            want = reference(x, scale=scale, config=config)
            mismatches += int(np.sum(got != want))
            changed += int(np.sum(want != reference(x, scale=scale, config=SparqConfig(window_bits=7))))
        out[name] = {"mismatches": mismatches, "changed": changed, "dtype": str(got.dtype), "shape": list(got.shape)}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def kernel_results() -> dict[str, dict[str, Any]]:
    pytest.importorskip("triton", reason="kernel tests need triton")
    pytest.importorskip("torch", reason="the triton interpreter runs on torch CPU tensors")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="0")
    code = "import tests.unit.test_sparq_plugin as m; m._run_cases()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data: dict[str, dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data


@pytest.mark.parametrize("name", list(SHAPES))
def test_kernel_is_bit_exact_for_every_option(kernel_results: dict[str, dict[str, Any]], name: str) -> None:
    case = kernel_results[name]
    assert case["mismatches"] == 0
    assert case["dtype"] == "int8" and case["shape"] == list(SHAPES[name][0])
    assert case["changed"] > 0  # the options really trim these codes


def test_attributes_round_trip_and_validate() -> None:
    config = SparqConfig(window_bits=4, placements=3, rounding=Rounding.TRUNCATE, vsparq=True)
    attrs = SparqQuantizeAttrs.from_config(config, scale=0.05)
    assert attrs.config() == config
    node = helper.make_node(OP_TYPE, ["x"], ["y"], domain=DOMAIN, **attrs.to_onnx_attributes())
    read = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    read = {k: v.decode() if isinstance(v, bytes) else v for k, v in read.items()}
    assert SparqQuantizeAttrs.from_onnx_attributes(read) == attrs
    assert SparqQuantizeAttrs.from_json(attrs.to_json()) == attrs
    assert SparqQuantizeAttrs.from_config(SparqConfig(window_bits=3), scale=1.0).placements == 6  # explicit
    with pytest.raises(GraphError, match="window_bits, placements"):
        SparqQuantizeAttrs.from_onnx_attributes({"scale": 0.1})
    with pytest.raises(GraphError, match=r"unknown attribute 'windowbits'.*did you mean 'window_bits'"):
        SparqQuantizeAttrs.from_onnx_attributes({**read, "windowbits": 4})
    with pytest.raises(ConfigError, match="window_bits 8"):
        SparqQuantizeAttrs(scale=0.1, window_bits=8, placements=2)
    with pytest.raises(ConfigError, match=r"placements 4 .* allowed: 5"):
        SparqQuantizeAttrs(scale=0.1, window_bits=4, placements=4)
    with pytest.raises(GraphError, match="scale"):
        SparqQuantizeAttrs(scale=0.0, window_bits=4, placements=5)
    with pytest.raises(GraphError, match="round_nearest"):
        SparqQuantizeAttrs.from_onnx_attributes({**read, "round_nearest": 2})


def _ptx_params(ptx: str) -> list[str]:
    return re.findall(r"\.param\s+\.(u64|u32|b32|b64|f32)\b", ptx)


def test_aot_ptx_for_every_arch_has_the_tensorrt_abi(tmp_path: Path) -> None:
    pytest.importorskip("triton", reason="AOT compilation needs triton")
    from triton.backends.nvidia.compiler import get_ptxas

    from plugins.aot import SUPPORTED_ARCHS
    from plugins.sparq_quant.kernel import compile_sparq_quant

    for arch in SUPPORTED_ARCHS:
        k = compile_sparq_quant(dtype="float16", scale=0.05, config=SparqConfig(window_bits=3, vsparq=True), arch=arch)
        assert re.search(rf"^\.target sm_{arch}a?\b", k.ptx, re.MULTILINE)
        assert _ptx_params(k.ptx) == ["u64", "u32", "u32", "u64"]  # x, n_rows, n_cols, q: no scratch pointers
        assert "div.rn.f32" in k.ptx and "fma.rn.f32" not in k.ptx  # IEEE division, no contraction
        src = tmp_path / f"k{arch}.ptx"
        src.write_text(k.ptx)
        target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        proc = subprocess.run([get_ptxas(arch).path, f"-arch={target}", str(src), "-o", str(tmp_path / "k.cubin")],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr


def test_registration_passes_nvidias_tensorrt_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NVIDIA's tensorrt.plugin (from the tensorrt-cu12-bindings wheel) validates the registration, creates the
    plugin from an ONNX node as the parser would, and runs our shape and AOT launch hooks on symbolic shapes."""
    harness = pytest.importorskip("tests.qdp_harness")
    wheels = harness.bindings_wheels()
    if not wheels:
        pytest.skip("no tensorrt-cu12-bindings wheel in <venv>/share/build-engine or BUILD_ENGINE_WHEEL_DIR")
    from plugins import aot

    monkeypatch.setattr(aot, "current_target", lambda: aot.GpuTarget(arch=89, ptx_isa=88))  # no GPU here
    config = SparqConfig(window_bits=4, placements=3, vsparq=True)
    attrs = SparqQuantizeAttrs.from_config(config, scale=0.05)
    node = helper.make_node(OP_TYPE, ["x"], ["y"], domain=DOMAIN, **attrs.to_onnx_attributes())
    for wheel in wheels:
        with harness.load_tensorrt_plugin(wheel, tmp_path) as package:
            from plugins.sparq_quant.plugin import PLUGIN_ID, register

            assert register() == register() == PLUGIN_ID  # idempotent
            plugin = harness.parse_plugin_node(package, node)
            x_shape: list[int | str] = ["batch", "seq", 1536]
            types, shapes = harness.output_shapes(plugin, [x_shape], [package.trt.float16])
            assert types == [package.trt.int8]
            env = {"batch": 8, "seq": 128}
            assert [harness.evaluate(d, env) for d in shapes[0]] == [8, 128, 1536]
            run = harness.launch(plugin, [(x_shape, package.trt.float16)], [(x_shape, package.trt.int8)],
                                 {"batch": (1, 8, 32), "seq": (1, 128, 128)})
            assert run.kernel_name == "sparq_quant_kernel" and ".target sm_89" in run.ptx
            pairs = 8 * 128 * 1536 // 2
            assert harness.evaluate(run.grid[0], env) == -(-pairs // 512)
            assert [harness.evaluate(e, env) for e in run.extra] == [8 * 128, 1536]
            assert harness.evaluate(run.block[0], env) == 128


def test_onnx_node_checks_as_a_custom_domain_op() -> None:
    attrs = SparqQuantizeAttrs.from_config(SparqConfig(), scale=0.1)
    node = helper.make_node(OP_TYPE, ["x"], ["y"], domain=DOMAIN, **attrs.to_onnx_attributes())
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.INT8, [2, 4])])
    onnx.checker.check_model(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 19), helper.make_opsetid(DOMAIN, 1)]))
