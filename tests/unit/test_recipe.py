"""Recipes: YAML presets, unknown-key errors, selectors (last match wins), overrides."""

from __future__ import annotations

import pytest

from builder.graph.analyze import analyze
from builder.graph.report import GraphReport, Role
from builder.quant.centered import CenteredConfig
from builder.quant.peg import PegConfig
from builder.quant.static import StaticConfig
from builder.recipes.loader import (
    load_preset,
    load_recipe,
    preset_names,
    recipe_from_json,
    recipe_from_yaml,
    recipe_to_json,
    recipe_to_yaml,
)
from builder.recipes.model import Precision, Recipe, Rule, Selector, Settings
from builder.recipes.overrides import check_overrides, parse_fallback, parse_fallbacks
from builder.recipes.resolve import resolve
from calib.errors import ConfigError
from tests.toygraphs import bert_block_model

EXPECTED_PRESETS = {"fp16", "int8-gemm", "hero-m1", "hero-m2", "hero-m3", "bondarenko-mp", "bondarenko-peg",
                    "smooth-w8a8", "smooth-mp", "int8-all-linear", "sparq-b4", "sparq-v4", "smooth-sparq-b4",
                    "smooth-sparq-v4"}


@pytest.fixture(scope="module")
def report() -> GraphReport:
    return analyze(bert_block_model(layers=2), name="toy_bert")


def test_every_preset_ships_and_round_trips() -> None:
    assert set(preset_names()) == EXPECTED_PRESETS
    for name in preset_names():
        recipe = load_preset(name)
        assert recipe.name == name
        assert recipe_from_yaml(recipe_to_yaml(recipe)) == recipe
        assert recipe_from_json(recipe_to_json(recipe)) == recipe


def test_unknown_preset_suggests_close_match() -> None:
    with pytest.raises(ConfigError, match="did you mean 'int8-gemm'"):
        load_preset("int8-gem")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nrules: []\nrulez: []\n", "unknown key 'rulez'"),
        ("name: x\nrules:\n  - select: {role: [fc1]}\n    set: {precision: int8}\n", "unknown key 'role'.*roles"),
        ("name: x\nrules:\n  - set: {precison: int8}\n", "unknown key 'precison'.*precision"),
        ("name: x\nrules:\n  - set: {precision: int4}\n", "precision 'int4' is not allowed"),
        ("name: x\nrules:\n  - select: {roles: [fc3]}\n    set: {precision: int8}\n", "unknown role 'fc3'"),
        ("name: x\n", "missing required key 'rules'"),
        ("name: x\nname: y\nrules: []\n", "appears twice"),
        ("name: x\nrules:\n  - set: {activation: {quantizer: sparq9}}\n", "unknown activation quantizer"),
        ("name: x\nrules:\n  - set: {activation: {quantizer: centred}}\n", "did you mean 'centered'"),
        ("name: x\nrules:\n  - set: {activation: {quantizer: peg, group: 4}}\n", "unknown key 'group'.*groups"),
        ("name: x\nrules:\n  - set: {activation: {quantizer: peg, groups: 0}}\n", "groups 0 must be at least 1"),
        ("name: x\nrules:\n  - set: {activation: {range: max}}\n", "expected a mapping with a 'quantizer' key"),
        ("name: x\nrules:\n  - set: {weight: {quantizer: rtn, bits: 9}}\n", "bits 9 is outside 2..8"),
        ("name: x\nrules:\n  - set: {activation: {quantizer: static, percentile: 40}}\n", "percentile 40"),
        ("name: x\nrules: []\nversion: 9\n", "version 9 not supported"),
        ("version: 1\nname: x\nrules: []\n", "version 1 .* is no longer read"),
    ],
)
def test_bad_recipe_yaml_is_rejected(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        recipe_from_yaml(text)


def test_recipe_file_path_must_exist(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("/nonexistent/recipe.yaml")


def test_last_matching_rule_wins_per_field(report: GraphReport) -> None:
    recipe = Recipe(name="t", rules=(
        Rule(select=Selector(roles=(Role.FC1, Role.FC2)), set=Settings(precision=Precision.INT8)),
        Rule(select=Selector(roles=(Role.FC2,), layers=(1,)), set=Settings(precision=Precision.FP16)),
        Rule(select=Selector(roles=(Role.FC2,)),
             set=Settings(activation=StaticConfig(range="percentile", percentile=99.9))),
    ))
    resolved = resolve(recipe, report)
    fc2 = {a.layer: resolved[a.node] for a in report.by_role(Role.FC2)}
    assert fc2[0].settings.precision == Precision.INT8
    assert fc2[1].settings.precision == Precision.FP16  # rule 1 set precision; rule 2 only the range
    assert fc2[1].precision_rule == 1
    assert fc2[0].settings.activation == StaticConfig(range="percentile", percentile=99.9)
    fc1 = report.by_role(Role.FC1)[0]
    assert resolved[fc1.node].settings.activation == StaticConfig(range="max")  # built-in default
    attn = report.by_role(Role.ATTN_QK)[0]
    assert resolved[attn.node].settings.precision == Precision.FP32
    assert resolved[attn.node].precision_note == "recipe defaults"


def test_name_glob_selects_nodes(report: GraphReport) -> None:
    node = report.by_role(Role.FC2)[1].node
    recipe = Recipe(name="t", rules=(Rule(select=Selector(names=(node[:-2] + "*",)),
                                          set=Settings(precision=Precision.BF16)),))
    resolved = resolve(recipe, report)
    assert resolved[node].settings.precision == Precision.BF16


def test_selector_matching_nothing_is_an_error_unless_optional(report: GraphReport) -> None:
    missing = Rule(select=Selector(roles=(Role.QKV,)), set=Settings(precision=Precision.INT8))
    with pytest.raises(ConfigError, match="matches no node: role 'qkv' is not in the model"):
        resolve(Recipe(name="t", rules=(missing,)), report)
    optional = Rule(select=Selector(roles=(Role.QKV,), optional=True), set=Settings(precision=Precision.INT8))
    assert resolve(Recipe(name="t", rules=(optional,)), report)
    far = Rule(select=Selector(layers=(7,)), set=Settings(precision=Precision.FP16))
    with pytest.raises(ConfigError, match="layer 7 does not exist"):
        resolve(Recipe(name="t", rules=(far,)), report)


def test_flagged_selector_needs_the_outlier_report(report: GraphReport) -> None:
    recipe = load_preset("bondarenko-mp")
    with pytest.raises(ConfigError, match="outlier report"):
        resolve(recipe, report, None)
    resolved = resolve(recipe, report, (1,))
    by_layer = {(a.role, a.layer): resolved[a.node].settings.precision for a in report.assignments}
    assert by_layer[(Role.FC1, 1)] == Precision.FP16 and by_layer[(Role.FC2, 1)] == Precision.FP16
    assert by_layer[(Role.FC1, 0)] == Precision.INT8 and by_layer[(Role.Q_PROJ, 1)] == Precision.INT8


def test_fallback_overrides_parse() -> None:
    o = parse_fallback("layer.5.fc2=fp16")
    assert o.selector == Selector(layers=(5,), roles=(Role.FC2,)) and o.precision == Precision.FP16
    o = parse_fallback("role:softmax=bf16")
    assert o.selector == Selector(roles=(Role.ATTN_SOFTMAX,)) and o.precision == Precision.BF16
    assert parse_fallback("layer.3=fp32").selector == Selector(layers=(3,))
    assert parse_fallback("name:*/output/dense/*=fp16").selector == Selector(names=("*/output/dense/*",))
    with pytest.raises(ConfigError, match="dtype 'fp8' not allowed"):
        parse_fallback("layer.1=fp8")
    with pytest.raises(ConfigError, match="not understood"):
        parse_fallback("block5=fp16")
    with pytest.raises(ConfigError, match="expected TARGET=DTYPE"):
        parse_fallback("layer.1")
    with pytest.raises(ConfigError, match=r"conflicting overrides for 'layer\.1\.fc2'"):
        parse_fallbacks(["layer.1.fc2=fp16", "layer.1.fc2=bf16"])


def test_override_naming_missing_layer_suggests_close_matches(report: GraphReport) -> None:
    overrides = parse_fallbacks(["layer.7.fc2=fp16"])
    with pytest.raises(ConfigError, match=r"layer 7 does not exist \(the model has layers 0-1\).*did you mean"):
        check_overrides(overrides, report)
    check_overrides(parse_fallbacks(["layer.1.fc2=fp16", "role:softmax=bf16"]), report)


def test_overrides_win_over_recipe_rules(report: GraphReport) -> None:
    recipe = load_preset("int8-gemm")
    extra = tuple(o.to_rule() for o in parse_fallbacks(["layer.1.fc2=fp16"]))
    resolved = resolve(recipe.with_rules(extra), report)
    fc2 = {a.layer: resolved[a.node] for a in report.by_role(Role.FC2)}
    assert fc2[1].settings.precision == Precision.FP16 and "--fallback layer.1.fc2=fp16" in fc2[1].precision_note
    assert fc2[0].settings.precision == Precision.INT8


def test_quantizer_configs_round_trip_through_yaml() -> None:
    recipe = Recipe(name="t", rules=(
        Rule(select=Selector(roles=(Role.FC2,)), set=Settings(activation=CenteredConfig(range="mse"))),
        Rule(select=Selector(roles=(Role.FC1,)), set=Settings(activation=PegConfig(groups=4))),
    ))
    text = recipe_to_yaml(recipe)
    assert "quantizer: centered" in text and "quantizer: peg" in text
    assert recipe_from_yaml(text) == recipe
