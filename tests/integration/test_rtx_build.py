"""Real TensorRT-RTX engines of MiniLM on the CPU: FP32, an FP16 copy, and the lowered portable variants.

Each build uses the lowest builder optimization level and a dynamic batch x sequence profile; the build
time lands in the manifest (and in `make bench`'s table).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.backends.options import BackendName, BuildOptions, DimRange, ShapeProfile
from builder.engine.build import BuildInputs, BuildOutcome, build_engine_dir

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (build-engine[rtx]) is not installed")

logger = logging.getLogger(__name__)

OPTIONS = BuildOptions(
    backend=BackendName.TENSORRT_RTX,
    optimization_level=0,
    architectures=("sm86", "sm89"),
    profiles=(ShapeProfile(batch=DimRange(min=1, opt=8, max=32), seq=DimRange(min=1, opt=128, max=128)),),
)
HIDDEN = 384


def fp16_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Whole-graph FP16 copy (weights, constants, Casts); graph outputs are cast back to FP32."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph

    def to_half(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == TensorProto.FLOAT:
            half = np.clip(numpy_helper.to_array(tensor), -65504, 65504).astype(np.float16)
            tensor.CopyFrom(numpy_helper.from_array(half, tensor.name))

    for init in graph.initializer:
        to_half(init)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                to_half(attr.t)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    del graph.value_info[:]
    for out in graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        for node in graph.node:
            node.output[:] = [f"{o}_fp16" if o == out.name else o for o in node.output]
            node.input[:] = [f"{i}_fp16" if i == out.name else i for i in node.input]
        graph.node.append(helper.make_node("Cast", [f"{out.name}_fp16"], [out.name], to=TensorProto.FLOAT))
    return copy


def check_minilm_engine(outcome: BuildOutcome) -> None:
    manifest = outcome.manifest
    assert not outcome.reused
    assert outcome.plan_path.stat().st_size == manifest.plan_bytes > 1_000_000
    assert [(t.name, t.shape) for t in manifest.inputs] == [("input_ids", (-1, -1)), ("attention_mask", (-1, -1))]
    outputs = {t.name: t for t in manifest.outputs}
    assert outputs["last_hidden_state"].shape == (-1, -1, HIDDEN)
    assert outputs["sentence_embedding"].shape == (-1, HIDDEN)
    assert manifest.profiles[0]["input_ids"] == {"min": [1, 1], "opt": [8, 128], "max": [32, 128]}
    logger.info("%s: built in %.2f s", manifest.name, manifest.build_time_s)


def test_minilm_fp32_engine(minilm_onnx: Path, tmp_path: Path) -> None:
    outcome = build_engine_dir(BuildInputs(model_path=minilm_onnx), OPTIONS, tmp_path / "engines" / "fp32")
    check_minilm_engine(outcome)
    assert {t.dtype for t in outcome.manifest.outputs} == {"float32"}


def test_minilm_fp16_copy_engine(minilm_onnx: Path, tmp_path: Path) -> None:
    model = fp16_copy(onnx.load(str(minilm_onnx)))
    onnx.checker.check_model(model)
    import onnxruntime as ort

    ids = np.array([[101, 2023, 2003, 1037, 3231, 6251, 102, 0]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}
    reference = ort.InferenceSession(str(minilm_onnx)).run(["sentence_embedding"], feeds)[0]
    half = ort.InferenceSession(model.SerializeToString()).run(["sentence_embedding"], feeds)[0]
    assert float(np.sum(reference * half)) > 0.999  # the copy really is MiniLM, in FP16
    path = tmp_path / "fp16" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path))
    check_minilm_engine(build_engine_dir(BuildInputs(model_path=path), OPTIONS, tmp_path / "engines" / "fp16"))


@pytest.fixture(scope="module")
def minilm_ranges(minilm_quantize: Any) -> Any:
    """The preset quantizer over the shared MiniLM statistics (32 VADER calibration sentences)."""
    return minilm_quantize


def lowered_variant(minilm_onnx: Path, ranges: Any, preset: str, out: Path) -> Path:
    """The portable variant of ``preset`` (analyze -> plan -> weights -> lower), saved as ``out``."""
    del minilm_onnx
    quantized = ranges(preset, "portable")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(quantized.serialize())
    return out


@pytest.mark.parametrize("preset", ["fp16", "int8-gemm", "hero-m2"])
def test_minilm_portable_variant_engine(minilm_onnx: Path, minilm_ranges: Any, tmp_path: Path, preset: str) -> None:
    path = lowered_variant(minilm_onnx, minilm_ranges, preset, tmp_path / preset / "model.onnx")
    model = onnx.load(str(path), load_external_data=False)
    if preset != "fp16":
        assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    check_minilm_engine(build_engine_dir(BuildInputs(model_path=path), OPTIONS, tmp_path / "engines" / preset))
