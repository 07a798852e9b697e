"""The quantizer seam: a toy activation and a toy weight quantizer, each one file under tests/quantizers/,
registered from this test, plan and lower a model without any change to an existing module; the lowered graph
computes exactly what their NumPy references say."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.graph.analyze import analyze
from builder.graph.report import GraphReport, Role
from builder.pipeline import quantize
from builder.plan.artifact import load_plan
from builder.quant import registry
from builder.recipes.loader import recipe_from_yaml, recipe_to_yaml
from builder.recipes.model import Precision, Recipe, Rule, Selector, Settings
from calib.errors import ConfigError
from calib.statistics import Statistics
from tests.quantizers.pow2_activation import Pow2Config, Pow2Params, Pow2Quantizer
from tests.quantizers.ternary_weight import TernaryConfig, TernaryQuantizer, ternarize
from tests.toygraphs import bert_block_model
from tests.unit.test_lower import real_feeds, run_ort
from tests.unit.test_plan import toy_statistics

WEIGHT_ROLES = (Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_OUT, Role.FC1, Role.FC2)


@pytest.fixture
def registered() -> Iterator[None]:
    activation, weight = Pow2Quantizer(), TernaryQuantizer()
    registry.register_activation(activation)
    registry.register_weight(weight)
    yield
    del registry.ACTIVATION_QUANTIZERS[activation.name], registry.WEIGHT_QUANTIZERS[weight.name]
    del registry._BY_CONFIG[Pow2Config], registry._BY_CONFIG[TernaryConfig]


@pytest.fixture(scope="module")
def toy() -> tuple[onnx.ModelProto, GraphReport, Statistics]:
    model = bert_block_model(layers=1, hidden=32, heads=2, ffn=64)
    report = analyze(model, name="toy_bert")
    return model, report, toy_statistics(model, report, sentences=16)


def _recipe() -> Recipe:
    return Recipe(name="toys", rules=(Rule(select=Selector(roles=WEIGHT_ROLES), set=Settings(
        precision=Precision.INT8, activation=Pow2Config(headroom=1.5), weight=TernaryConfig(threshold=0.4))),))


def test_toy_quantizers_plan_and_lower_exactly(registered: None, toy: tuple[onnx.ModelProto, GraphReport,
                                                                            Statistics]) -> None:
    model, report, stats = toy
    recipe = _recipe()
    assert recipe_from_yaml(recipe_to_yaml(recipe)) == recipe  # recipes name them: quantizer: toy-pow2
    result = quantize(model, report, recipe, stats)
    assert load_plan(result.plan.to_json()) == result.plan  # params typed back through the registry
    q = result.model.model
    feeds = real_feeds()
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    gemms = [a for a in report.assignments if a.role in WEIGHT_ROLES]
    edges = {e.tensor: e for e in result.plan.activations}
    for a in gemms:
        node = next(n for n in q.graph.node if n.name == a.node)
        out = run_ort(q, feeds, [a.inputs[0], node.input[0], node.input[1]])
        edge = edges[a.inputs[0]]
        assert edge.quantizer == "toy-pow2" and isinstance(edge.params, Pow2Params)
        expected_exponent = int(np.ceil(np.log2(stats.get(a.inputs[0]).minmax.abs_max * 1.5 / 127)))
        assert edge.params.exponent == expected_exponent
        np.testing.assert_array_equal(out[node.input[0]], Pow2Quantizer().reference(out[a.inputs[0]], edge.params))
        assert a.weight is not None and a.weight_axis is not None
        values, scales = ternarize(original[a.weight], a.weight_axis, 0.4)
        np.testing.assert_array_equal(out[node.input[1]], values.astype(np.float32) * scales[None, :])
        assert set(np.unique(values)) <= {-1, 0, 1}


def test_unregistered_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown activation quantizer 'toy-pow2'"):
        recipe_from_yaml("name: x\nrules:\n  - set: {activation: {quantizer: toy-pow2}}\n")
    with pytest.raises(ConfigError, match=r"unknown weight quantizer 'toy-ternary'.*known: .*rtn"):
        recipe_from_yaml("name: x\nrules:\n  - set: {weight: {quantizer: toy-ternary}}\n")


def test_options_of_a_registered_quantizer_are_strict(registered: None) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'headrom'.*did you mean 'headroom'"):
        recipe_from_yaml("name: x\nrules:\n  - set: {activation: {quantizer: toy-pow2, headrom: 2}}\n")
    with pytest.raises(ConfigError, match=r"threshold 1\.5"):
        recipe_from_yaml("name: x\nrules:\n  - set: {weight: {quantizer: toy-ternary, threshold: 1.5}}\n")


@pytest.mark.parametrize("config", ["static", "centered", "fwq"])
def test_builtin_references_equal_the_lowered_graph(toy: tuple[onnx.ModelProto, GraphReport, Statistics],
                                                    config: str) -> None:
    """What every FC1 reads in the lowered graph equals its quantizer's NumPy reference (FWQ: the folded value
    the GEMM multiplies, DQ(Q(x / S)) with S moved into the weight, within one INT8 step of x / S)."""
    from builder.quant.registry import activation_config, activation_quantizer

    model, report, stats = toy
    recipe = Recipe(name="one", rules=(Rule(select=Selector(roles=(Role.FC1,)), set=Settings(
        precision=Precision.INT8, activation=activation_config({"quantizer": config}, "test"))),))
    result = quantize(model, report, recipe, stats)
    q = result.model.model
    fc1 = report.find(Role.FC1, 0)
    assert fc1 is not None
    node = next(n for n in q.graph.node if n.name == fc1.node)
    plan_edge = next(e for e in result.plan.activations if e.tensor == fc1.inputs[0])
    quantizer = activation_quantizer(config)
    out = run_ort(q, real_feeds(), [fc1.inputs[0], node.input[0]])
    expected = quantizer.reference(out[fc1.inputs[0]], plan_edge.params)
    read = out[node.input[0]]
    if config == "centered":
        read = (read + np.float32(plan_edge.params.offset)).astype(np.float32)
        np.testing.assert_array_equal(read, expected)
    elif config == "static":
        np.testing.assert_array_equal(read, expected)
    else:
        s = np.asarray(plan_edge.params.feature_scale, dtype=np.float32)
        step = plan_edge.params.amax / 127
        assert np.max(np.abs(read * s - expected) / s) <= step * 1.0001
        assert np.mean(read * s == expected) > 0.99
