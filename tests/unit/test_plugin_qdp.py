"""Our Quickly Deployable Plugin registrations, checked by NVIDIA's own ``tensorrt.plugin`` code (no GPU).

``tests/qdp_harness.py`` imports the pure-Python package from the ``tensorrt-cu12-bindings`` wheels (10.9,
10.16, 11.4 when present) under a stand-in for the native bindings. What runs here, unmodified: the
registration checks of ``register`` / ``aot_impl`` (``_validate.py``), the plugin creator that turns the
ONNX parser's fields into our attributes and picks AOT or JIT (``_lib.py``), and the AOT plugin class that
calls our descriptor on symbolic shapes and our ``aot_impl`` for the kernel, grid and extra arguments
(``_plugin_class.py``). The PTX is really compiled (Triton, on the CPU). What waits for a GPU: TensorRT's
build calling these hooks, the driver loading the PTX, the kernel's output (``tests/gpu/``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.backends.plugin_check import check_plugin_nodes, check_registered
from builder.lower.fuse_plugins import fuse_plugins
from calib.errors import BackendUnavailable, ConfigError, GraphError
from plugins.aot import GpuTarget, choose_ptx_isa, driver_ptx_isa
from plugins.common import check_aot_tensorrt
from tests import qdp_harness as qh

pytest.importorskip("triton", reason="the AOT implementation compiles PTX with triton")

WHEELS = qh.bindings_wheels()
pytestmark = pytest.mark.skipif(
    not WHEELS, reason="no tensorrt-cu12-bindings wheel in <venv>/share/build-engine or $BUILD_ENGINE_WHEEL_DIR "
    "(`make setup` downloads it)")
TARGET = GpuTarget(arch=89, ptx_isa=84)  # an Ada GPU with a CUDA 12.4 driver: what the driver query would say


@pytest.fixture(params=WHEELS, ids=lambda w: ".".join(map(str, qh.wheel_version(w))))
def package(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[qh.PluginPackage]:
    monkeypatch.setattr("plugins.aot.current_target", lambda: TARGET)
    with qh.load_tensorrt_plugin(request.param, tmp_path) as loaded:
        yield loaded


def _registered(package: qh.PluginPackage) -> tuple[str, ...]:
    from plugins.layernorm_quant.plugin import register as register_ln
    from plugins.softmax_quant.plugin import register as register_sm

    return register_ln() + register_sm()


def _toy(seq: int | str = "seq", hidden: int = 32) -> onnx.ModelProto:
    """x, r -> Add -> LN -> Q/DQ -> MatMul -> (+ mask [B,1,S]) -> Softmax -> Q/DQ; the LN output also feeds a
    residual Add, so every registered form but the plain ones appears after fusion."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.random(hidden) + 0.5).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((hidden, 16)).astype(np.float32), "w")]
    nodes = [helper.make_node("Add", ["x", "r"], ["sum"], name="residual_add"),
             helper.make_node("LayerNormalization", ["sum", "g", "b"], ["ln"], name="ln", axis=-1, epsilon=1e-5)]
    for name, src, scale in (("ln", "ln", 0.05), ("sm", "sm", 1 / 127)):
        if name == "sm":
            nodes += [helper.make_node("MatMul", ["ln_dq", "w"], ["mm"], name="mm"),
                      helper.make_node("Add", ["mm", "mask"], ["scores"], name="mask_add"),
                      helper.make_node("Softmax", ["scores"], ["sm"], name="softmax", axis=-1)]
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                  numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")]
        nodes += [helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_Q"),
                  helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])]
    nodes.append(helper.make_node("Add", ["ln", "x"], ["out"], name="next_residual"))
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("x", f32, ["batch", seq, hidden]),
         helper.make_tensor_value_info("r", f32, ["batch", seq, hidden]),
         helper.make_tensor_value_info("mask", f32, ["batch", 1, 16])],
        [helper.make_tensor_value_info("sm_dq", f32, ["batch", seq, 16]),
         helper.make_tensor_value_info("out", f32, ["batch", seq, hidden])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_every_form_passes_nvidias_registration_checks(package: qh.PluginPackage) -> None:
    ids = _registered(package)
    assert set(ids) == {
        "build_engine::LayerNormQuantize", "build_engine_residual::LayerNormQuantize",
        "build_engine_normalized::LayerNormQuantize", "build_engine_residual_normalized::LayerNormQuantize",
        "build_engine::SoftmaxQuantize", "build_engine_masked::SoftmaxQuantize",
    }
    assert _registered(package) == ids  # idempotent: a second register() adds nothing and raises nothing
    creator = package.registry.get_creator("LayerNormQuantize", "1", "build_engine_residual")
    assert [f.name for f in creator.field_names] == ["epsilon", "scale", "per_token", "has_residual",
                                                     "emit_normalized"]


def test_the_old_registration_style_is_what_nvidias_checks_reject(package: qh.PluginPackage) -> None:
    """The checks run for real: string annotations (``from __future__ import annotations``), ``Any``-typed
    tensors and a ``Tuple[TensorDesc, ...]`` return, as the first version of plugin.py had, are refused."""
    trtp = package.trtp
    namespace: dict[str, object] = {}
    exec(  # a registration written the old way, in a module with postponed annotations
        "from __future__ import annotations\nfrom typing import Any\n"
        "def desc(x: Any, scale: float, has_mask: int) -> Any:\n    return x\n", namespace)
    with pytest.raises((ValueError, TypeError)):  # 11.x: "TensorDescs args should come first"; 10.x: issubclass
        trtp.register("old_style::SoftmaxQuantize")(namespace["desc"])

    source = "def many(x: trtp.TensorDesc, scale: float) -> tuple[trtp.TensorDesc, ...]:\n    return (x,)\n"
    # evaluated annotations (not inheriting this module's __future__ import), but a variable-length return
    exec(compile(source, "<many>", "exec", dont_inherit=True), {"trtp": trtp}, namespace)
    with pytest.raises(TypeError):  # issubclass(Ellipsis, TensorDesc)
        trtp.register("old_style2::SoftmaxQuantize")(namespace["many"])


def test_lowered_nodes_parse_into_aot_plugins_with_our_output_shapes(package: qh.PluginPackage) -> None:
    _registered(package)
    fused = fuse_plugins(_toy()).model
    needs = check_plugin_nodes(fused)
    assert [n.plugin_id for n in needs] == ["build_engine_masked::SoftmaxQuantize",
                                            "build_engine_residual_normalized::LayerNormQuantize"]
    check_registered(needs, package.registry.get_creator)  # what the backend asks TensorRT's registry
    aot_class = package.module("_plugin_class")._TemplateAOTPlugin
    shapes = {"x": ["batch", "seq", 32], "r": ["batch", "seq", 32], "g": [32], "b": [32],
              "mm": ["batch", "seq", 16], "mask": ["batch", 1, 16]}
    env = {"batch": 3, "seq": 7}
    for node in (n for n in fused.graph.node if n.domain == "build_engine"):
        plugin = qh.parse_plugin_node(package, node)
        assert isinstance(plugin, aot_class)  # no `aot` attribute: the creator picks the only implementation
        in_shapes = [shapes[i] for i in node.input]
        before = [[qh.dim(d).evaluate(env) for d in s] for s in in_shapes]
        types, outs = qh.output_shapes(plugin, in_shapes, [qh.DataType.FLOAT] * len(in_shapes))
        got = [[qh.evaluate(e, env) for e in out] for out in outs]
        x_shape = before[0]
        if node.op_type == "LayerNormQuantize":
            assert types == [qh.DataType.INT8, qh.DataType.FLOAT] and got == [x_shape, x_shape]
        else:
            assert types == [qh.DataType.INT8] and got == [x_shape]
        # the input's own shape expressions are untouched by the descriptor
        assert [[qh.evaluate(e, env) for e in d.shape_expr] for d in plugin.input_descs] == before


def test_network_api_call_of_the_gpu_test_is_accepted(package: qh.PluginPackage) -> None:
    """``tests/integration/test_plugin_tensorrt.py`` adds the plugin through ``trtp.op`` with array attributes;
    NVIDIA's PluginDef checks the call against the registration and yields an AOT plugin."""
    _registered(package)
    inp = package.trt.ITensor()
    make = package.trtp.op.build_engine.SoftmaxQuantize(inp, scale=np.array([1 / 127], np.float32),
                                                        has_mask=np.array([0], np.int32))
    inputs, _, plugin = make(qh.QuickPluginCreationRequest.STRICT_AOT)
    assert inputs == [inp] and isinstance(plugin, package.module("_plugin_class")._TemplateAOTPlugin)
    with pytest.raises(ValueError, match="Unexpected type"):  # a Python float where the registration has an array
        package.trtp.op.build_engine.SoftmaxQuantize(inp, scale=1 / 127, has_mask=np.array([0], np.int32))


def test_unregistered_or_mislabelled_nodes_are_refused_before_parsing(package: qh.PluginPackage) -> None:
    fused = fuse_plugins(_toy()).model
    with pytest.raises(ConfigError, match=r"--plugin-module plugins\.layernorm_quant\.plugin"):
        check_registered(check_plugin_nodes(fused), package.registry.get_creator)
    _registered(package)
    ln = next(n for n in fused.graph.node if n.op_type == "LayerNormQuantize")
    del ln.input[3]  # a 3-input node still labelled with the residual form's attributes
    with pytest.raises(GraphError, match="takes 4 input"):
        check_plugin_nodes(fused)
    jit = fuse_plugins(_toy()).model
    sm = next(n for n in jit.graph.node if n.op_type == "SoftmaxQuantize")
    sm.attribute.append(helper.make_attribute("aot", 0))
    with pytest.raises(GraphError, match="aot=0"):
        check_plugin_nodes(jit)
    with pytest.raises(ValueError, match="JIT implementation requested"):  # what TensorRT would have said
        qh.parse_plugin_node(package, sm)


def _ptx_params(ptx: str) -> int:
    return len(re.findall(r"^\s*\.param\s", ptx, re.MULTILINE))


def test_dynamic_softmax_width_compiles_for_the_profile_maximum(package: qh.PluginPackage) -> None:
    from plugins.softmax_quant.kernel import broadcast_strides, launch_config

    _registered(package)
    fused = fuse_plugins(_toy()).model
    node = next(n for n in fused.graph.node if n.op_type == "SoftmaxQuantize")
    plugin = qh.parse_plugin_node(package, node)
    x, mask = ["batch", 12, "seq", "seq"], ["batch", 1, 1, "seq"]
    qh.output_shapes(plugin, [x, mask], [qh.DataType.HALF] * 2)
    run = qh.launch(plugin, [(x, qh.DataType.HALF), (mask, qh.DataType.HALF)], [(x, qh.DataType.INT8)],
                    {"batch": (1, 4, 8), "seq": (1, 64, 200)})
    assert re.search(r"^\.version 8\.4$", run.ptx, re.MULTILINE)  # the driver's ISA, not Triton's newest
    assert re.search(r"^\.target sm_89\b", run.ptx, re.MULTILINE)
    assert f".entry {run.kernel_name}(" in run.ptx
    assert _ptx_params(run.ptx) == 2 + 8 + 1  # inputs, int32 extras, output: TensorRT's AOT argument order
    _, rows, warps = launch_config(200)  # compiled for the profile maximum (a 256-lane block)
    for batch, seq in ((1, 1), (2, 37), (8, 200)):
        env = {"batch": batch, "seq": seq}
        extra = [qh.evaluate(e, env) for e in run.extra]
        n_rows = batch * 12 * seq
        assert extra[:4] == [n_rows, seq, 12, seq]
        want = broadcast_strides((batch, 12, seq, seq), (batch, 1, 1, seq))
        # a stride only matters along an axis of x longer than 1 (elsewhere the index is always 0)
        assert [s for s, n in zip(extra[4:], (batch, 12, seq, seq), strict=True) if n > 1] == [
            s for s, n in zip(want, (batch, 12, seq, seq), strict=True) if n > 1]
        assert qh.evaluate(run.grid[0], env) == -(-n_rows // rows)
        assert qh.evaluate(run.block[0], env) == warps * 32


def test_layernorm_launch_has_the_kernel_abi(package: qh.PluginPackage) -> None:
    from plugins.layernorm_quant.kernel import launch_config

    _registered(package)
    node = next(n for n in fuse_plugins(_toy()).model.graph.node if n.op_type == "LayerNormQuantize")
    plugin = qh.parse_plugin_node(package, node)
    x = ["batch", "seq", 32]
    qh.output_shapes(plugin, [x, [32], [32], x], [qh.DataType.FLOAT] * 4)
    run = qh.launch(plugin, [(x, qh.DataType.FLOAT), ([32], qh.DataType.FLOAT), ([32], qh.DataType.FLOAT),
                             (x, qh.DataType.FLOAT)], [(x, qh.DataType.INT8), (x, qh.DataType.FLOAT)],
                    {"batch": (1, 2, 4), "seq": (1, 8, 16)})
    assert _ptx_params(run.ptx) == 4 + 2 + 2  # x, gamma, beta, residual; n_rows, hidden; codes, normalized
    _, rows, _, iters = launch_config(32)
    env = {"batch": 3, "seq": 5}
    assert [qh.evaluate(e, env) for e in run.extra] == [15, 32]
    assert qh.evaluate(run.grid[0], env) == -(-15 // (rows * iters))


def test_tensorrt_versions_without_aot_plugins_are_refused() -> None:
    for version in ("10.8.0.43", "10.6.0", "9.3.0.1", "x.y"):
        with pytest.raises(BackendUnavailable):
            check_aot_tensorrt(version)
    for version in ("10.9.0.34", "10.16.1.11", "11.4.0.106"):
        check_aot_tensorrt(version)


def test_ptx_isa_follows_the_driver_and_refuses_a_driver_too_old() -> None:
    assert [driver_ptx_isa(v) for v in (11080, 12000, 12040, 12060, 12080, 12090, 13000, 13020)] == [
        78, 80, 84, 85, 87, 88, 90, 92]
    assert choose_ptx_isa(90, 12000) == 80 and choose_ptx_isa(75, 11080) == 78
    with pytest.raises(BackendUnavailable, match=r"sm_120, which needs PTX ISA >= 8\.7"):
        choose_ptx_isa(120, 12060)
    with pytest.raises(BackendUnavailable, match=r"sm_100"):
        choose_ptx_isa(100, 12040)
    with pytest.raises(ConfigError, match="sm_70"):
        choose_ptx_isa(70, 12040)
