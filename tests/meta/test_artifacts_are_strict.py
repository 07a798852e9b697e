"""Meta: every artifact is a frozen msgspec Schema (calib.schema) and rejects an unknown key at every depth.

1. An AST scan of ``builder/``, ``calib/`` and ``plugins/`` finds every class that defines ``from_json`` or
   ``from_dict``; each must be a :class:`calib.schema.Schema`, unless it is on :data:`NOT_YET_SCHEMAS` (each
   entry says why; an entry whose class became a Schema or disappeared fails, so the list only shrinks).
2. Every such Schema is an artifact of :data:`PROBES`: an instance built here round-trips through its JSON
   and its reader, and adding the key ``"bogus"`` to any object of that JSON (the top level and every nested
   Struct the instance holds) raises ConfigError naming ``'bogus'``.
3. Every Struct type an artifact can hold is frozen and forbids unknown fields.
4. The hand-written strict readers answer the same probe: recipes (typed dataclasses read by
   ``builder.recipes.model.recipe_from_dict``; excluded from the scan) and the classes on NOT_YET_SCHEMAS.
"""

from __future__ import annotations

import ast
import importlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from calib.errors import ConfigError, ToolkitError
from calib.schema import Schema, to_json

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("builder", "calib", "plugins")
READERS = frozenset({"from_json", "from_dict"})
# Recipes are typed dataclasses (YAML only serializes them) parsed by a strict hand-written reader; the
# recipe probe below checks that it rejects unknown keys.
EXCLUDED_FILES = frozenset({"builder/recipes/model.py"})
# Readers that are not Schemas yet: (module, class) -> why. They must pass the "bogus" probe too (with any
# ToolkitError: a plugin node's attributes are a graph error, exit 3); convert them and delete the entry.
NOT_YET_SCHEMAS: dict[tuple[str, str], str] = {
    ("plugins.common", "PluginAttributes"): "plugin attributes (the base of every plugin's); strict via "
                                            "check_known_keys",
}
# the plugin attribute classes that read through PluginAttributes (each probed below)
PLUGIN_ATTRIBUTES = [("plugins.layernorm_quant.schema", "LayerNormQuantizeAttrs"),
                     ("plugins.softmax_quant.schema", "SoftmaxQuantizeAttrs"),
                     ("plugins.sparq_quant.schema", "SparqQuantizeAttrs")]


def _readers() -> Iterator[tuple[str, str]]:
    """(module, class) of every class under SCANNED that defines from_json or from_dict."""
    for root in SCANNED:
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            rel = path.relative_to(REPO_ROOT).as_posix()
            if rel in EXCLUDED_FILES:
                continue
            module = rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), rel)):
                if isinstance(node, ast.ClassDef) and any(
                        isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and f.name in READERS for f in node.body):
                    yield module, node.name


READER_CLASSES = sorted(set(_readers()))


def _load(module: str, name: str) -> type:
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type)
    return cls


@pytest.mark.parametrize(("module", "name"), READER_CLASSES, ids=[f"{m}.{n}" for m, n in READER_CLASSES])
def test_every_reader_class_is_a_schema(module: str, name: str) -> None:
    cls = _load(module, name)
    if (module, name) in NOT_YET_SCHEMAS:
        assert not issubclass(cls, Schema), f"{module}.{name} is a Schema now: delete it from NOT_YET_SCHEMAS"
        return
    assert issubclass(cls, Schema), (
        f"{module}.{name} defines from_json/from_dict but is not a calib.schema.Schema: artifacts are frozen "
        "msgspec Structs decoded with calib.schema.decode_json / convert (unknown keys are errors)")


def test_not_yet_schemas_entries_still_exist() -> None:
    assert set(NOT_YET_SCHEMAS) <= set(READER_CLASSES), "a NOT_YET_SCHEMAS entry names no reader class: delete it"


# --- the artifact probes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """An artifact type, an instance of it, and how it is written and read back."""

    cls: type[Any]  # a Schema subclass
    make: Callable[[], Any]
    dump: Callable[[Any], str] = lambda value: str(value.to_json())
    read: Callable[[str], Any] | None = None  # default: cls.from_json

    def load(self, text: str) -> Any:
        reader = self.read or self.cls.from_json
        return reader(text)


def _quant_plan() -> Any:
    from builder.plan.artifact import ActivationEdge, NodePlan, QuantPlan, WeightEdge
    from builder.quant.base import Placement
    from builder.quant.rtn import RtnConfig
    from builder.quant.static import StaticParams
    from builder.recipes.model import Precision

    return QuantPlan(
        model_name="toy", recipe_name="int8-gemm", recipe_sha256="a" * 64, statistics_digest="b" * 64,
        model_dtype=Precision.FP32,
        activations=(ActivationEdge(tensor="x", consumers=("fc1",), placement=Placement.WEIGHT_INPUT,
                                    quantizer="static", params=StaticParams(amax=2.5), method="max"),),
        weights=(WeightEdge(node="fc1", weight="w", input="x", axis=1, quantizer="rtn", config=RtnConfig()),),
        nodes=(NodePlan(node="fc1", role="fc1", layer=0, precision=Precision.INT8, reason="rule 1",
                        gemm_flops=4096.0),),
    )


def _load_plan(text: str) -> Any:
    from builder.plan.artifact import load_plan

    return load_plan(text)


def _statistics_meta() -> Any:
    from calib.layout import TensorLayout
    from calib.statistics import BatchRange, StatisticsMeta

    return StatisticsMeta(model_sha256="c" * 64, tensors=(), kinds={}, options={"bins": 2048},
                          layouts={"x": TensorLayout(token_axes=(0, 1))}, batches=(BatchRange(start=0, stop=2),),
                          samples=32, data_digest="d" * 64, data_source="vader:32", complete=True)


def _statistics_meta_via_npz(text: str) -> Any:
    """The metadata through Statistics.load, from a ``statistics.npz`` whose ``__meta__`` is ``text``."""
    from calib.statistics import Statistics

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "statistics.npz"
        np.savez(path, __meta__=np.asarray(text))
        return Statistics.load(path).meta


def _range_table() -> Any:
    from calib.range_table import RangeMethod, RangeTable, TensorRange

    rng = TensorRange(tensor="x", amax=3.0, method=RangeMethod.PERCENTILE, percentile=99.99, observed_min=-2.0,
                      observed_max=3.5, dim_min=(-2.0, 0.0), dim_max=(3.5, 1.0))
    return RangeTable(model_name="toy", model_sha256="e" * 64, num_samples=8, data_source="vader:8",
                      ranges={"x": rng})


def _outlier_report() -> Any:
    from calib.outliers import OutlierReport, OutlierRow

    row = OutlierRow(tensor="h", layer=0, role="fc2", width=4, amax=40.0, percentiles=(3.0, 4.0, 4.5),
                     max_over_p9999=8.9, outlier_dims=(2,), outlier_dim_amax=(40.0,), median_dim_amax=2.0,
                     range_share=0.9, top_tokens=(("[SEP]", 40.0, 3),))
    return OutlierReport(factor=6.0, rows=(row,))


def _graph_report() -> Any:
    from builder.graph.report import GraphReport, Role, RoleAssignment

    fc1 = RoleAssignment(node="fc1", op_type="MatMul", role=Role.FC1, layer=0, inputs=("x",), outputs=("h",),
                         weight="w", weight_axis=1)
    return GraphReport(model_name="toy", architecture="bert", num_layers=1, hidden_size=4, assignments=(fc1,),
                       num_heads=1, head_dim=4)


def _manifest() -> Any:
    from tests.unit.test_manifest_schema import manifest

    return manifest()


def _latency_report() -> Any:
    from builder.profile.report import LatencyReport, LatencyResult, LatencyStats

    stats = LatencyStats.from_samples([1.0, 2.0, 4.0])
    result = LatencyResult(label="int8", runtime="tensorrt", runtime_version="10.9", model="e", batch=2, seq=8,
                           warmup_ms=10.0, latency=stats, compute=stats, h2d=stats, d2h=stats, throughput_qps=5.0,
                           flags={"iterations": 3})
    return LatencyReport(results=(result,), skipped=("fp32 tensorrt: no GPU",), host={"machine": "x86_64"})


def _fuse_config() -> Any:
    from builder.lower.fuse_plugins import FusePluginsConfig

    return FusePluginsConfig(mask=False)


def _stage_keys() -> Any:
    from builder.cli.steps import StageKeys

    return StageKeys(steps={"calibrate": "f" * 64})


def _build_options() -> Any:
    from builder.backends.options import (
        BuildOptions,
        DimRange,
        LayerDtype,
        LayerPrecision,
        PluginSpec,
        ShapeProfile,
        Typing,
    )

    profile = ShapeProfile(batch=DimRange(min=1, opt=2, max=4), seq=DimRange(min=1, opt=8, max=16),
                           past=DimRange(min=0, opt=8, max=16))
    return BuildOptions(profiles=(profile,), typing=Typing.WEAK, plugins=(PluginSpec(module="m"),),
                        layer_precisions=(LayerPrecision(pattern="fc2", dtype=LayerDtype.FP16),))


def _options_from(text: str) -> Any:
    from builder.backends.options import BuildOptions

    return BuildOptions.from_dict(json.loads(text))


def _profile_from(text: str) -> Any:
    from builder.backends.options import ShapeProfile

    return ShapeProfile.from_dict(json.loads(text))


def _accuracy_report() -> Any:
    from builder.evaluate.report import AccuracyReport, LayerError, Skipped

    return AccuracyReport(model_name="toy", computed=("outputs",),
                          skipped=(Skipped(figure="sentence", reason="no pooled output"),),
                          layer_errors=(LayerError(layer=0, point="block", tensor="h", relative_error=0.01,
                                                   max_abs_error=0.2),))


def _accuracy_from_dict(text: str) -> Any:
    from builder.evaluate.report import AccuracyReport

    return AccuracyReport.from_dict(json.loads(text))


def _sweep_report() -> Any:
    from builder.backends.options import DimRange, ShapeProfile
    from builder.distributed.sweep_report import SweepReport, SweepRow

    profile = ShapeProfile(batch=DimRange(min=1, opt=2, max=4), seq=DimRange(min=1, opt=8, max=16))
    row = SweepRow(recipe="int8-gemm", backend="tensorrt-rtx", backend_version="1.7", architecture="sm86",
                   profile=profile, engine_dir="int8-gemm/e", plan_bytes=10, build_time_s=1.0, reused=False,
                   int8_gemm_flop_share=0.9, cosine_mean=0.99)
    return SweepReport(model="m.onnx", calibration="calibration/statistics.npz", rows=(row,))


def _search_report() -> Any:
    from builder.search.report import SearchReport, Timing
    from builder.search.search import Measurement, Point

    answer = Point(index=3, phase="bisect", key="full:l0.ffn", fallback=("l0.ffn",), islands=1,
                   measurement=Measurement(share=0.9, metrics={"cosine": 0.9991}, samples=64, seconds=1.5))
    timing = Timing(prepare_s=1.0, search_s=2.0, new_evaluations=4, recorded_evaluations=0, segments_run=3,
                    segments_total=8, evaluation_s=1.8, cpus=2, load_start=(0.1, 0.2, 0.3), load_end=(0.4, 0.5, 0.6))
    return SearchReport(model="m.onnx", base_recipe="hero-m3", recipe_file="recipe.yaml", budget="cosine>=0.999",
                        metric="cosine", threshold=0.999, reference=1.0, slice="train[0:64]", samples=64,
                        quick_samples=16, granularity="layer-role", fallback_precision="fp16", met=True, stop="done",
                        feasible=True, answer=answer, units=("l0.ffn", "l0.attn"), sensitivity={"l0.ffn": 0.01},
                        order=("l0.ffn", "l0.attn"), presets_skipped={}, timing=timing)


# (id, module, class, probe factory): classes are imported when the test runs, not at collection
PROBES: list[tuple[str, str, str, Callable[[type[Schema]], Probe]]] = [
    ("QuantPlan", "builder.plan.artifact", "QuantPlan", lambda c: Probe(c, _quant_plan, read=_load_plan)),
    ("StatisticsMeta", "calib.statistics", "StatisticsMeta",
     lambda c: Probe(c, _statistics_meta, dump=to_json, read=_statistics_meta_via_npz)),
    ("RangeTable", "calib.range_table", "RangeTable", lambda c: Probe(c, _range_table)),
    ("OutlierReport", "calib.outliers", "OutlierReport", lambda c: Probe(c, _outlier_report)),
    ("GraphReport", "builder.graph.report", "GraphReport", lambda c: Probe(c, _graph_report)),
    ("EngineManifest", "builder.engine.manifest", "EngineManifest", lambda c: Probe(c, _manifest)),
    ("LatencyReport", "builder.profile.report", "LatencyReport", lambda c: Probe(c, _latency_report)),
    ("FusePluginsConfig", "builder.lower.fuse_plugins", "FusePluginsConfig", lambda c: Probe(c, _fuse_config)),
    ("StageKeys", "builder.cli.steps", "StageKeys", lambda c: Probe(c, _stage_keys)),
    ("SweepReport", "builder.distributed.sweep_report", "SweepReport", lambda c: Probe(c, _sweep_report)),
    ("BuildOptions", "builder.backends.options", "BuildOptions",
     lambda c: Probe(c, _build_options, dump=lambda v: json.dumps(v.to_dict()), read=_options_from)),
    ("ShapeProfile", "builder.backends.options", "ShapeProfile",
     lambda c: Probe(c, lambda: _build_options().profiles[0], dump=lambda v: json.dumps(v.to_dict()),
                     read=_profile_from)),
    ("AccuracyReport", "builder.evaluate.report", "AccuracyReport", lambda c: Probe(c, _accuracy_report)),
    ("SearchReport", "builder.search.report", "SearchReport", lambda c: Probe(c, _search_report)),
    ("AccuracyReport.from_dict", "builder.evaluate.report", "AccuracyReport",
     lambda c: Probe(c, _accuracy_report, read=_accuracy_from_dict)),
]
PROBE_IDS = [p[0] for p in PROBES]


def _probe(module: str, name: str, factory: Callable[[type[Schema]], Probe]) -> Probe:
    cls = _load(module, name)
    assert issubclass(cls, Schema), f"{module}.{name} is not a Schema"
    return factory(cls)


def test_every_schema_reader_is_probed() -> None:
    probed = {(module, name) for _, module, name, _ in PROBES}
    unprobed = sorted(set(READER_CLASSES) - probed - set(NOT_YET_SCHEMAS))
    assert not unprobed, f"add an instance of each of these artifacts to PROBES: {unprobed}"


def _struct_paths(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """The JSON path of every Struct (written as an object) inside ``value``, the value itself included."""
    if isinstance(value, msgspec.Struct):
        if value.__struct_config__.array_like:
            return
        yield path
        for info in msgspec.structs.fields(value):
            yield from _struct_paths(getattr(value, info.name), (*path, info.encode_name))
    elif isinstance(value, tuple | list):
        for index, item in enumerate(value):
            yield from _struct_paths(item, (*path, index))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _struct_paths(item, (*path, key))


def _inject(text: str, path: tuple[str | int, ...]) -> str:
    data = json.loads(text)
    node = data
    for step in path:
        node = node[step]
    assert isinstance(node, dict), f"{path} is not an object in the JSON"
    node["bogus"] = node.get("bogus", 1)
    return json.dumps(data)


@pytest.mark.parametrize(("module", "name", "factory"), [p[1:] for p in PROBES], ids=PROBE_IDS)
def test_artifact_round_trips(module: str, name: str, factory: Callable[[type[Schema]], Probe]) -> None:
    probe = _probe(module, name, factory)
    value = probe.make()
    assert isinstance(value, probe.cls)
    assert probe.load(probe.dump(value)) == value


@pytest.mark.parametrize(("module", "name", "factory"), [p[1:] for p in PROBES], ids=PROBE_IDS)
def test_unknown_key_is_rejected_at_every_depth(module: str, name: str,
                                                factory: Callable[[type[Schema]], Probe]) -> None:
    probe = _probe(module, name, factory)
    value = probe.make()
    text = probe.dump(value)
    paths = list(_struct_paths(value))
    assert paths[0] == ()
    for path in paths:
        with pytest.raises(ConfigError, match="'bogus'") as info:
            probe.load(_inject(text, path))
        assert info.value.exit_code == 2, path


def _struct_types(type_: Any) -> Iterator[msgspec.inspect.StructType]:
    seen: set[type] = set()
    stack = [msgspec.inspect.type_info(type_)]
    while stack:
        info = stack.pop()
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in seen:
                continue
            seen.add(info.cls)
            yield info
            stack.extend(f.type for f in info.fields)
        elif isinstance(info, msgspec.inspect.UnionType):
            stack.extend(info.types)
        elif isinstance(info, msgspec.inspect.TupleType):
            stack.extend(info.item_types)
        elif isinstance(info, msgspec.inspect.DictType):
            stack.extend((info.key_type, info.value_type))
        elif hasattr(info, "item_type"):  # list, variadic tuple, set, frozenset
            stack.append(info.item_type)


@pytest.mark.parametrize(("module", "name"), sorted({p[1:3] for p in PROBES}))
def test_every_struct_an_artifact_holds_is_frozen_and_strict(module: str, name: str) -> None:
    for info in _struct_types(_load(module, name)):
        config = info.cls.__struct_config__
        assert info.forbid_unknown_fields, f"{info.cls.__qualname__} (in {name}) accepts unknown keys"
        assert config.frozen, f"{info.cls.__qualname__} (in {name}) is not frozen"


# --- hand-written strict readers ------------------------------------------------------------------------------


def _recipe_yaml_with_bogus(where: tuple[str | int, ...]) -> str:
    import importlib.resources

    import yaml

    text = (importlib.resources.files("builder.recipes.presets") / "int8-gemm.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    node = data
    for step in where:
        node = node[step]
    node["bogus"] = 1
    return str(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("where", [(), ("defaults",), ("rules", 0), ("rules", 0, "select"), ("rules", 0, "set"),
                                   ("rules", 0, "set", "activation")], ids=lambda w: ".".join(map(str, w)) or "$")
def test_recipe_reader_rejects_unknown_keys(where: tuple[str | int, ...]) -> None:
    from builder.recipes.loader import load_preset, recipe_from_yaml, recipe_to_yaml

    assert recipe_from_yaml(recipe_to_yaml(load_preset("int8-gemm"))) == load_preset("int8-gemm")
    with pytest.raises(ConfigError, match="'bogus'"):
        recipe_from_yaml(_recipe_yaml_with_bogus(where))


def _plugin_attrs(module: str, name: str) -> Any:
    cls = _load(module, name)
    if name == "LayerNormQuantizeAttrs":
        return cls(epsilon=1e-5, scale=0.05)
    if name == "SoftmaxQuantizeAttrs":
        return cls(scale=0.5, has_mask=True)
    if name == "SparqQuantizeAttrs":
        return cls(scale=0.5, window_bits=4, placements=2)
    raise AssertionError(f"add an instance of {module}.{name} here")


@pytest.mark.parametrize(("module", "name"), PLUGIN_ATTRIBUTES, ids=[n for _, n in PLUGIN_ATTRIBUTES])
def test_not_yet_schemas_are_strict_by_hand(module: str, name: str) -> None:
    value = _plugin_attrs(module, name)
    cls = type(value)
    assert cls.from_json(value.to_json()) == value
    with pytest.raises(ToolkitError, match="'bogus'"):
        cls.from_json(_inject(value.to_json(), ()))
    assert isinstance(value, _load("plugins.common", "PluginAttributes"))
