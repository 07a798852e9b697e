"""Search units and the recipe of a choice: the YAML round trip reproduces exactly the chosen plan."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from builder.graph.report import GraphReport, Role
from builder.plan.artifact import QuantPlan
from builder.recipes.loader import load_recipe, recipe_from_yaml, recipe_to_yaml
from builder.recipes.model import Precision, Recipe
from builder.search.driver import check_recipe_plan
from builder.search.units import Granularity, Unit, glob_escape, islands, search_recipe, search_units
from calib.errors import BuildError
from calib.statistics import Statistics
from tests.toygraphs import bert_block_model


@dataclass(frozen=True)
class Toy:
    model: onnx.ModelProto
    report: GraphReport
    statistics: Statistics
    base: Recipe
    plan: QuantPlan


def calibrated_toy(layers: int = 2, recipe: str = "hero-m3", texts: int = 24) -> Toy:
    """A toy BERT calibrated on real VADER calibration sentences (the MiniLM tokenizer fits its vocabulary)."""
    from builder.evaluate.tokenizer import model_text_encoder
    from builder.intake.minilm import tokenizer_json_path
    from builder.pipeline import analyze_model, calibrate, plan_model, resolve_recipe
    from calib.data import calibration_texts

    model = bert_block_model(layers=layers, hidden=32)
    report = analyze_model(model, "toy")
    encoder = model_text_encoder(model, tokenizer_json_path())
    feeds = list(encoder.feeds(calibration_texts("vader", texts), 64, 8))
    statistics = calibrate(model, report, feeds).statistics
    base = resolve_recipe(recipe, report)
    return Toy(model=model, report=report, statistics=statistics, base=base,
               plan=plan_model(model, report, base, statistics))


@pytest.fixture(scope="module")
def toy() -> Toy:
    return calibrated_toy()


def test_units_are_the_int8_nodes_of_the_plan(toy: Toy) -> None:
    units = search_units(toy.report, toy.plan)
    int8 = {n.node for n in toy.plan.nodes if n.precision == Precision.INT8}
    assert sorted(n for u in units for n in u.nodes) == sorted(int8)
    assert [u.position for u in units] == sorted(u.position for u in units)
    total = sum(n.gemm_flops for n in toy.plan.nodes)
    assert sum(u.gemm_flops for u in units) / total == pytest.approx(toy.plan.int8_gemm_flop_share, rel=1e-12)
    keys = {u.key for u in units}
    assert {"embed_ln", "layer.0.fc2", "layer.1.attn_softmax", "layer.1.q_proj"} <= keys
    by_layer = search_units(toy.report, toy.plan, Granularity.LAYER)
    assert [u.key for u in by_layer] == ["outside", "layer.0", "layer.1"]
    assert len(search_units(toy.report, toy.plan, Granularity.NODE)) == len(int8)


def _choices(units: tuple[Unit, ...], count: int, seed: int = 0) -> list[frozenset[str]]:
    rng = np.random.default_rng(seed)
    keys = [u.key for u in units]
    picks = [frozenset(), frozenset(keys)]
    picks += [frozenset(k for k in keys if rng.random() < p) for p in np.linspace(0.1, 0.9, count)]
    return picks


@pytest.mark.parametrize("granularity", list(Granularity))
def test_the_recipe_yaml_reproduces_the_chosen_plan(toy: Toy, granularity: Granularity, tmp_path: Path) -> None:
    from builder.pipeline import plan_model

    units = search_units(toy.report, toy.plan, granularity)
    total = sum(n.gemm_flops for n in toy.plan.nodes)
    for index, fallback in enumerate(_choices(units, 6)):
        recipe = search_recipe(toy.base, toy.report, units, fallback, Precision.FP16, "cosine>=0.999")
        path = tmp_path / f"choice{index}.yaml"
        path.write_text(recipe_to_yaml(recipe), encoding="utf-8")
        back = load_recipe(str(path))  # what `quantize --recipe file.yaml` reads
        assert back.to_dict() == recipe.to_dict()
        plan = plan_model(toy.model, toy.report, back, toy.statistics)
        check_recipe_plan(back, plan, units, fallback, Precision.FP16)
        untouched = {n.node: n.precision for n in toy.plan.nodes if n.precision != Precision.INT8}
        assert {n.node: n.precision for n in plan.nodes if n.node in untouched} == untouched
        int8_work = sum(u.gemm_flops for u in units if u.key not in fallback)
        assert plan.int8_gemm_flop_share == pytest.approx(int8_work / total, rel=1e-12)


def test_a_plan_that_differs_from_the_choice_is_caught(toy: Toy) -> None:
    from builder.pipeline import plan_model

    units = search_units(toy.report, toy.plan)
    recipe = search_recipe(toy.base, toy.report, units, {"layer.0.fc2"}, Precision.FP16, "cosine>=0.999")
    plan = plan_model(toy.model, toy.report, recipe, toy.statistics)
    with pytest.raises(BuildError, match=r"layer\.0\.fc1"):
        check_recipe_plan(recipe, plan, units, {"layer.0.fc2", "layer.0.fc1"}, Precision.FP16)


def test_roles_falling_back_in_the_same_layers_share_one_rule(toy: Toy) -> None:
    units = search_units(toy.report, toy.plan)
    chosen = {"layer.0.fc1", "layer.0.fc2", "layer.1.fc1", "layer.1.fc2", "layer.1.attn_qk", "embed_ln"}
    recipe = search_recipe(toy.base, toy.report, units, chosen, Precision.BF16, "cosine>=0.999")
    added = recipe.rules[len(toy.base.rules):]
    assert [(tuple(r.value for r in rule.select.roles), rule.select.layers) for rule in added[:-1]] == [
        (("fc1", "fc2"), (0, 1)), (("attn_qk",), (1,))]
    embed = next(a.node for a in toy.report.assignments if a.role == Role.EMBED_LN)
    assert added[-1].select.names == (glob_escape(embed),)
    assert all(rule.set.precision == Precision.BF16 and "cosine>=0.999" in rule.note for rule in added)
    assert recipe.name == "hero-m3-search" and recipe_from_yaml(recipe_to_yaml(recipe)).rules == recipe.rules


@pytest.mark.parametrize("name", ["/body/layer.0/MatMul", "a[1]*b?", "x[[]y", "plain"])
def test_escaped_names_match_only_themselves(name: str) -> None:
    glob = glob_escape(name)
    assert fnmatch.fnmatchcase(name, glob)
    for other in (name + "x", "x" + name, name.replace("a", "b") if "a" in name else name[:-1]):
        if other != name:
            assert not fnmatch.fnmatchcase(other, glob)


def test_islands_are_runs_of_fallen_back_units_in_graph_order(toy: Toy) -> None:
    units = search_units(toy.report, toy.plan)
    keys = [u.key for u in units]
    assert islands(units, ()) == 0
    assert islands(units, set(keys)) == 1
    assert islands(units, {keys[1], keys[2]}) == 1
    assert islands(units, {keys[1], keys[3], keys[5]}) == 3
