"""The registered SPARQ activation quantizer and its plain low-bit baseline: configs and their errors, planning
(ranges, vSPARQ zero-pair counts against an independent count), lowering bit for bit against the NumPy
references in ONNX Runtime, the Q/DQ invariant checks on the composition, and the plugin variant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from builder.graph.analyze import analyze
from builder.graph.report import GraphReport, Role
from builder.lower.checks import check_qdq_invariants
from builder.lower.sparq_ops import METADATA_KEY
from builder.pipeline import quantize
from builder.plan.artifact import load_plan
from builder.plan.planner import plan
from builder.quant.lowbit import LowBitConfig, LowBitQuantizer, amax_mse_levels
from builder.quant.registry import activation_config, activation_quantizer, config_to_dict
from builder.quant.sparq import SparqParams, SparqQuantConfig
from builder.recipes.loader import load_preset
from builder.recipes.model import Precision, Recipe, Rule, Selector, Settings
from calib import methods
from calib.errors import ConfigError, InternalError
from calib.quant import quantize as int8_quantize
from calib.quant import scale_from_amax
from calib.sparq import Rounding, SparqConfig, sparq_int8, zero_pair_counts
from calib.statistics import Statistics
from tests.toygraphs import bert_block_model
from tests.unit.test_lower import real_feeds, run_ort

WEIGHT_ROLES = (Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_OUT, Role.FC1, Role.FC2)
Toy = tuple[onnx.ModelProto, GraphReport, Statistics, list[dict[str, np.ndarray]]]


def _calibration_feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    from builder.intake.minilm import tokenizer_json_path
    from calib.data import vader_splits
    from calib.tokenize import encode

    texts = [s.text for s in vader_splits().calibration[:16]]
    inputs = {i.name for i in model.graph.input}
    return [{k: v for k, v in f.items() if k in inputs}
            for f in encode(texts, tokenizer_json_path(), max_length=32, batch_size=8)]


@pytest.fixture(scope="module")
def toy() -> Toy:
    """A BERT block whose FC2 reduces over an odd K (63): vSPARQ's odd tail pairs with an implicit zero."""
    from builder.pipeline import calibrate
    from calib.collect import CollectOptions
    from calib.statistics import DEFAULT_KINDS

    model = bert_block_model(layers=1, hidden=30, heads=2, ffn=63)
    report = analyze(model, name="toy_bert")
    feeds = _calibration_feeds(model)
    every_kind = CollectOptions(kinds=(*DEFAULT_KINDS, "sparq_pairs"))  # one pass with the pair observer
    return model, report, calibrate(model, report, feeds, every_kind).statistics, feeds


def _recipe(activation: Any, roles: tuple[Role, ...] = WEIGHT_ROLES) -> Recipe:
    return Recipe(name="sparq-test", rules=(Rule(select=Selector(roles=roles), set=Settings(
        precision=Precision.INT8, activation=activation)),))


# -- configs and their errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"window_bits": 1}, r"window_bits 1 is not allowed; use an integer in 2\.\.7"),
    ({"window_bits": 8}, r"window_bits 8 is not allowed"),
    ({"window_bits": 4, "placements": 4}, r"placements 4 is not allowed for a 4-bit window; allowed: 5 \(5opt\), "
                                          r"3 \(3opt\), 2 \(2opt\)"),
    ({"rounding": "nearest"}, r"rounding 'nearest' is not known; use truncate or nearest_even; did you mean "
                              r"'nearest_even'"),
    ({"range": "fixed"}, r"'fixed' is not allowed at \$\.range; allowed: entropy, max, mse, percentile"),
    ({"percentile": 20.0, "range": "percentile"}, r"percentile 20.0 is outside"),
    ({"windowbits": 4}, r"unknown key 'windowbits'.*did you mean 'window_bits'"),
])
def test_bad_sparq_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        activation_config({"quantizer": "sparq", **options}, "test")


def test_configs_round_trip_through_recipes() -> None:
    config = activation_config({"quantizer": "sparq", "window_bits": 3, "rounding": "truncate", "vsparq": True,
                                "range": "percentile", "percentile": 99.9}, "test")
    assert isinstance(config, SparqQuantConfig)
    assert config.sparq() == SparqConfig(window_bits=3, placements=6, rounding=Rounding.TRUNCATE, vsparq=True)
    assert activation_config(config_to_dict(config), "again") == config
    low = activation_config({"quantizer": "lowbit", "bits": 4}, "test")
    assert low == LowBitConfig(bits=4, range="mse") and activation_config(config_to_dict(low), "again") == low
    for bits in (1, 9):
        with pytest.raises(ConfigError, match=rf"bits {bits} is not allowed; use an integer in 2\.\.8"):
            LowBitConfig(bits=bits)
    for name in ("sparq-b4", "sparq-v4"):
        activation = load_preset(name).rules[-1].set.activation
        assert isinstance(activation, SparqQuantConfig) and activation.vsparq == name.endswith("v4")


def test_a_bad_recipe_exits_2_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from builder.cli.main import main

    model_path = tmp_path / "toy.onnx"
    onnx.save(bert_block_model(layers=1, hidden=16, heads=2, ffn=32), str(model_path))
    cases = {"window_bits: 9": "window_bits 9 is not allowed", "placements: 6": "placements 6 is not allowed"}
    for option, message in cases.items():
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(f"name: bad\nrules:\n  - select: {{roles: [fc1]}}\n    set: {{precision: int8, "
                          f"activation: {{quantizer: sparq, {option}}}}}\n", encoding="utf-8")
        code = main(["quantize", str(model_path), "--recipe", str(recipe), "--print-config"])
        assert code == 2
        assert message in capsys.readouterr().err


def test_sparq_takes_only_weight_gemm_inputs(toy: Toy) -> None:
    _, report, stats, _ = toy
    with pytest.raises(ConfigError, match=r"quantizer 'sparq' cannot quantize operand tensors"):
        plan(report, _recipe(SparqQuantConfig(), (Role.ATTN_QK,)), stats)


def test_pair_counts_are_collected_on_demand_and_equal_one_pass(toy: Toy) -> None:
    """Calibration does not collect sparq_pairs by default: planning without data names what is missing; with
    the calibration batches the second pass gives the plan of a single pass that collected every kind."""
    from builder.pipeline import calibrate, plan_model
    from builder.plan.planner import MissingStatistics

    model, report, one_pass, feeds = toy
    default = calibrate(model, report, feeds).statistics
    recipe = _recipe(SparqQuantConfig(vsparq=True))
    with pytest.raises(MissingStatistics, match=r"sparq_pairs statistics of \d+ tensors") as missing:
        plan(report, recipe, default)
    assert set(missing.value.wanted) == {e.tensor for e in plan(report, recipe, one_pass).activations}
    on_demand = plan_model(model, report, recipe, default, feeds=feeds)
    assert on_demand.activations == plan_model(model, report, recipe, one_pass).activations


# -- planning --------------------------------------------------------------------------------------------------

def _calibration_values(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], tensors: list[str]
                        ) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(tensor values, valid-token mask [B, S]) of every calibration batch."""
    return [(run_ort(model, feed, tensors), feed["attention_mask"].astype(bool)) for feed in feeds]


def test_plan_reports_the_zero_pair_count_of_the_calibration_data(toy: Toy) -> None:
    """The bounds hold the count of pairs with a zero code, recounted independently from the calibration
    batches (padding excluded) with calib.sparq.zero_pair_counts at the plan's scale."""
    from calib.range_table import RangeMethod
    from calib.ranges import RangeSpec, tensor_amax

    model, report, stats, feeds = toy
    p = plan(report, _recipe(SparqQuantConfig(vsparq=True)), stats)
    assert load_plan(p.to_json()) == p
    assert {e.quantizer for e in p.activations} == {"sparq"}
    batches = _calibration_values(model, feeds, [e.tensor for e in p.activations])
    for edge in p.activations:
        params: SparqParams = edge.params
        assert params.amax == tensor_amax(stats.get(edge.tensor), RangeSpec(method=RangeMethod.MAX))
        assert edge.method == "max+vsparq4:5opt"
        pairs = with_zero = 0
        for values, mask in batches:
            counted = zero_pair_counts(int8_quantize(values[edge.tensor], scale_from_amax(params.amax)), mask)
            pairs, with_zero = pairs + counted.pairs, with_zero + counted.with_zero
        assert params.pairs == pairs, edge.tensor
        assert params.zero_pairs_low <= with_zero <= params.zero_pairs_high, edge.tensor
        assert params.zero_pairs_high - params.zero_pairs_low <= 0.01 * pairs
    fc2 = report.find(Role.FC2, 0)
    assert fc2 is not None
    gelu = next(e for e in p.activations if e.tensor == fc2.inputs[0]).params
    assert gelu.zero_pair_share > 0.01  # the GELU output holds codes that round to zero


# -- lowering, references and checks ---------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    {"quantizer": "sparq"},
    {"quantizer": "sparq", "vsparq": True},
    {"quantizer": "sparq", "window_bits": 3, "rounding": "truncate", "vsparq": True, "range": "mse"},
    {"quantizer": "sparq", "window_bits": 4, "placements": 2, "range": "percentile", "percentile": 99.9},
    {"quantizer": "lowbit", "bits": 4},
    {"quantizer": "lowbit", "bits": 3, "range": "max"},
])
def test_lowered_graph_equals_the_reference_bit_for_bit(toy: Toy, options: dict[str, Any]) -> None:
    model, report, stats, _ = toy
    result = quantize(model, report, _recipe(activation_config(options, "test")), stats)
    q = result.model.model
    check_qdq_invariants(q)
    quantizer = activation_quantizer(options["quantizer"])
    names = {}
    for edge in result.plan.activations:
        node = next(n for n in q.graph.node if n.name == edge.consumers[0])
        dq = next(n for n in q.graph.node if n.output[0] == node.input[0])
        names[edge.tensor] = (node.input[0], dq.input[0])
    out = run_ort(q, real_feeds(n=5, max_length=21), [t for e, pair in names.items() for t in (e, *pair)])
    for edge in result.plan.activations:
        read, codes_name = names[edge.tensor]
        np.testing.assert_array_equal(out[read], quantizer.reference(out[edge.tensor], edge.params))
        codes = out[codes_name]
        if options["quantizer"] == "lowbit":
            levels = 2 ** (options["bits"] - 1) - 1
            assert codes.min() >= -levels and codes.max() <= levels and np.abs(codes).max() == levels
        else:  # the composition's output: calib.sparq on QuantizeLinear's codes
            scale = scale_from_amax(edge.params.amax)
            np.testing.assert_array_equal(codes, sparq_int8(int8_quantize(out[edge.tensor], scale),
                                                             edge.params.sparq))


def _lowered_sparq(toy: Toy) -> onnx.ModelProto:
    model, report, stats, _ = toy
    return quantize(model, report, _recipe(SparqQuantConfig(vsparq=True)), stats).model.model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _span_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    prefix = next(p.value for n in model.graph.node for p in n.metadata_props if p.key == METADATA_KEY)
    return [n for n in model.graph.node if any(p.key == METADATA_KEY and p.value == prefix
                                               for p in n.metadata_props)]


def test_checks_accept_the_composition_and_reject_broken_shapes(toy: Toy) -> None:
    lowered = _lowered_sparq(toy)
    check_qdq_invariants(lowered)
    # the DequantizeLinear after a composition must repeat the QuantizeLinear's scale bit for bit
    broken = _copy(lowered)
    codes = _span_nodes(broken)[-1].output[0]
    dq = next(n for n in broken.graph.node if codes in n.input)
    broken.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.5, dtype=np.float32), "other_scale"))
    dq.input[1] = "other_scale"
    with pytest.raises(InternalError, match="unequal scales"):
        check_qdq_invariants(broken)
    # a node outside the composition may not read its intermediates
    broken = _copy(lowered)
    inner = _span_nodes(broken)[2].output[0]
    broken.graph.node.append(onnx.helper.make_node("Identity", [inner], ["leak"], name="leak"))
    with pytest.raises(InternalError, match="is read outside it"):
        check_qdq_invariants(broken)
    # a composition with a node dropped is not a composition
    broken = _copy(lowered)
    broken.graph.node.remove(_span_nodes(broken)[-1])
    with pytest.raises(InternalError, match="incomplete"):
        check_qdq_invariants(broken)
    # its codes must come from a QuantizeLinear
    broken = _copy(lowered)
    entry = _span_nodes(broken)[0]
    q = next(n for n in broken.graph.node if n.output[0] == entry.input[0])
    broken.graph.node.append(onnx.helper.make_node("Identity", [q.output[0]], ["laundered"], name="launder"))
    entry.input[0] = "laundered"
    with pytest.raises(InternalError):
        check_qdq_invariants(broken)


def test_plugin_variant_replaces_q_and_composition_by_sparq_quantize(toy: Toy) -> None:
    model, report, stats, _ = toy
    result = quantize(model, report, _recipe(SparqQuantConfig(vsparq=True)), stats, variant="plugin")
    fused = result.model.model
    nodes = [n for n in fused.graph.node if n.op_type == "SparqQuantize"]
    assert len(nodes) == len(result.plan.activations)
    assert not any(p.key == METADATA_KEY for n in fused.graph.node for p in n.metadata_props)
    assert not [i.name for i in fused.graph.initializer if "_sparq/" in i.name]  # its constants went with it
    by_tensor = {e.tensor: e.params for e in result.plan.activations}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        params = by_tensor[node.input[0]]
        assert attrs["scale"] == float(scale_from_amax(params.amax)) and attrs["vsparq"] == 1
        readers = [n for n in fused.graph.node if node.output[0] in n.input]
        assert [r.op_type for r in readers] == ["DequantizeLinear"] * len(readers) and readers
    # the engine-build check knows the node: TensorRT's parser will look up build_engine::SparqQuantize
    from builder.backends.plugin_check import check_plugin_nodes

    assert "build_engine::SparqQuantize" in {need.plugin_id for need in check_plugin_nodes(fused)}


@pytest.mark.slow  # loading the onnxruntime-extensions custom-op library takes ~10 s
def test_plugin_variant_computes_what_the_portable_one_does(toy: Toy) -> None:
    from plugins.ort_ops import make_session

    model, report, stats, _ = toy
    recipe = _recipe(SparqQuantConfig(vsparq=True, window_bits=3))
    portable = quantize(model, report, recipe, stats).model.model
    plugin = quantize(model, report, recipe, stats, variant="plugin").model.model
    feeds = real_feeds(n=5, max_length=21)
    expected = run_ort(portable, feeds)["last_hidden_state"]
    got = make_session(plugin).run(["last_hidden_state"], feeds)[0]
    np.testing.assert_array_equal(got, expected)


# -- the low-bit baseline's range ------------------------------------------------------------------------------

def test_mse_at_127_levels_is_the_int8_mse_method() -> None:
    rng = np.random.default_rng(5)
    counts = np.bincount(np.minimum(np.abs(rng.standard_t(3, 200_000)) * 80, 999).astype(int), minlength=1000)
    assert amax_mse_levels(counts, 0.0125, 127) == methods.amax_mse(counts, 0.0125, start_bin=0)


def test_mse_at_4_bits_minimises_the_4_bit_error_by_brute_force() -> None:
    rng = np.random.default_rng(6)
    counts = np.bincount(np.minimum(np.abs(rng.standard_normal(50_000)) * 50, 299).astype(int), minlength=300)
    width = 0.02
    centers = (np.arange(300) + 0.5) * width

    def error(amax: float) -> float:
        scale = amax / 7
        return float(np.sum(counts * (np.minimum(np.round(centers / scale), 7) * scale - centers) ** 2))

    best = amax_mse_levels(counts, width, 7)
    assert error(best) == min(error(c) for c in centers)
    assert best < 0.6 * centers[counts > 0].max()  # 4 bits clip much harder than the observed max


def test_lowbit_quantizer_reference_is_clip_then_b_bit_grid() -> None:
    from builder.quant.lowbit import LowBitParams

    params = LowBitParams(amax=0.7, bits=4)
    x = np.array([-2.0, -0.7, -0.05, 0.0, 0.049, 0.05, 0.3, 0.7, 9.0], dtype=np.float32)
    step = np.float32(0.7 / 7)
    expected = (np.clip(np.rint(np.clip(x, -0.7, 0.7) / step), -7, 7) * step).astype(np.float32)
    np.testing.assert_array_equal(LowBitQuantizer().reference(x, params), expected)
