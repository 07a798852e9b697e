"""Build options: parsing, validation with clear messages, JSON round trip; backend selection errors."""

from __future__ import annotations

import json

import pytest

from builder.backends.base import TensorSpec
from builder.backends.options import (
    BackendName,
    BuildOptions,
    DimRange,
    Int8Mode,
    LayerDtype,
    LayerPrecision,
    PluginSpec,
    ShapeProfile,
    Typing,
)
from builder.backends.trt_api import profile_shapes
from calib.errors import ConfigError


def test_dim_range_parses_triples_and_single_values() -> None:
    assert DimRange.parse("1,8,32", "--batch") == DimRange(min=1, opt=8, max=32)
    assert DimRange.parse("16", "--seq") == DimRange(min=16, opt=16, max=16)


@pytest.mark.parametrize("text", ["8,4,1", "1,40,32", "0,1,2"])
def test_profile_with_min_above_max_or_zero_is_rejected(text: str) -> None:
    with pytest.raises(ConfigError, match="min"):
        DimRange.parse(text, "--batch")


def test_profile_text_that_is_not_integers_is_named() -> None:
    with pytest.raises(ConfigError, match="'1,x,3'"):
        DimRange.parse("1,x,3", "--seq")


def test_unknown_backend_suggests_close_match() -> None:
    with pytest.raises(ConfigError, match="did you mean 'tensorrt-rtx'") as info:
        BackendName.parse("tensorrt_rtx")
    assert info.value.exit_code == 2


def test_unknown_architecture_lists_targets_and_close_match() -> None:
    with pytest.raises(ConfigError, match=r"sm90.*did you mean") as info:
        BuildOptions(architectures=("sm90",))
    assert "sm86" in str(info.value)


def test_architectures_are_normalized() -> None:
    assert BuildOptions(architectures=("86", "SM_89", "sm120")).architectures == ("sm86", "sm89", "sm120")


def test_implicit_int8_needs_cache_and_weak_typing() -> None:
    with pytest.raises(ConfigError, match="calibration cache"):
        BuildOptions(int8_mode=Int8Mode.IMPLICIT, typing=Typing.WEAK)
    with pytest.raises(ConfigError, match="weakly typed"):
        BuildOptions(int8_mode=Int8Mode.IMPLICIT, calibration_cache="c.cache")


def test_layer_precisions_need_weak_typing() -> None:
    with pytest.raises(ConfigError, match="Cast nodes"):
        BuildOptions(layer_precisions=(LayerPrecision(pattern="*fc2*", dtype=LayerDtype.FP16),))


def test_plugin_spec_needs_exactly_one_source() -> None:
    with pytest.raises(ConfigError):
        PluginSpec()
    with pytest.raises(ConfigError):
        PluginSpec(library="a.so", module="m")


def test_options_round_trip_through_json_dict() -> None:
    options = BuildOptions(
        backend=BackendName.TENSORRT,
        profiles=(ShapeProfile(batch=DimRange(min=1, opt=4, max=8), seq=DimRange(min=16, opt=64, max=128)),),
        workspace_mib=512,
        optimization_level=1,
        timing_cache="tc.bin",
        typing=Typing.WEAK,
        int8_mode=Int8Mode.IMPLICIT,
        calibration_cache="c.cache",
        layer_precisions=(LayerPrecision(pattern="/encoder/layer.5/*", dtype=LayerDtype.FP16),),
        plugins=(PluginSpec(module="plugins.layernorm_quant.plugin"), PluginSpec(library="libx.so")),
    )
    assert BuildOptions.from_dict(options.to_dict()) == options


def test_profile_shapes_map_batch_and_sequence_axes() -> None:
    profile = ShapeProfile(batch=DimRange(min=1, opt=4, max=8), seq=DimRange(min=2, opt=64, max=128))
    spec = TensorSpec(name="input_ids", dtype="int64", shape=(-1, -1))
    assert profile_shapes(spec, profile) == ((1, 2), (4, 64), (8, 128))
    hidden = TensorSpec(name="h", dtype="float32", shape=(-1, 7, 384))
    assert profile_shapes(hidden, profile) == ((1, 7, 384), (4, 7, 384), (8, 7, 384))


def test_dynamic_axis_beyond_sequence_is_refused() -> None:
    profile = ShapeProfile(batch=DimRange(min=1, opt=1, max=1), seq=DimRange(min=1, opt=1, max=1))
    with pytest.raises(ConfigError, match="axis 2"):
        profile_shapes(TensorSpec(name="img", dtype="float32", shape=(-1, 3, -1)), profile)


def test_precision_list_becomes_escaped_node_patterns() -> None:
    import fnmatch

    from builder.backends.options import precision_constraints

    rules = precision_constraints({"/layer.5/fc2/MatMul": "fp16", "/layer.0/fc1/MatMul": "int8", "odd[1]*": "bf16"})
    assert [(r.pattern, r.dtype) for r in rules] == [
        ("/layer.5/fc2/MatMul", LayerDtype.FP16), ("odd[[]1][*]", LayerDtype.BF16)
    ]
    assert fnmatch.fnmatchcase("odd[1]*", rules[1].pattern)
    assert not fnmatch.fnmatchcase("odd1x", rules[1].pattern)
    # the node itself, not its siblings: the parser's helper layers are found through their metadata
    assert not fnmatch.fnmatchcase("/layer.5/fc2/MatMul_1", rules[0].pattern)
    with pytest.raises(ConfigError, match="int4"):
        precision_constraints({"n": "int4"})


def test_past_profile_allows_an_empty_cache_and_round_trips() -> None:
    past = DimRange.parse("0,128,1024", "--past", minimum=0)
    profile = ShapeProfile(batch=DimRange.parse("1,4,8", "--batch"), seq=DimRange.parse("1,1,64", "--seq"), past=past)
    assert ShapeProfile.from_dict(profile.to_dict()) == profile
    options = BuildOptions(profiles=(profile,))
    assert BuildOptions.from_dict(options.to_dict()) == options
    with pytest.raises(ConfigError, match="min=0 must be >= 1"):
        DimRange.parse("0,1,2", "--seq")
    with pytest.raises(ConfigError, match=r"unknown key 'pasts' at \$; allowed: batch, seq, past; did you mean 'past'"):
        ShapeProfile.from_dict({"batch": [1, 1, 1], "seq": [1, 1, 1], "pasts": [0, 1, 2]})


def test_options_json_keeps_its_shape() -> None:
    """The JSON object is the one manifests of version 1 recorded (and stage reuse hashes): written out here."""
    options = BuildOptions(
        backend=BackendName.TENSORRT, typing=Typing.WEAK, architectures=("sm86",),
        profiles=(ShapeProfile(batch=DimRange(min=1, opt=2, max=4), seq=DimRange(min=1, opt=8, max=16)),
                  ShapeProfile(batch=DimRange(min=1, opt=1, max=1), seq=DimRange(min=1, opt=1, max=8),
                               past=DimRange(min=0, opt=4, max=8))),
        layer_precisions=(LayerPrecision(pattern="fc2", dtype=LayerDtype.BF16),),
        plugins=(PluginSpec(library="libx.so"),),
    )
    assert json.loads(json.dumps(options.to_dict())) == {
        "version": 1, "backend": "tensorrt",
        "profiles": [{"batch": [1, 2, 4], "seq": [1, 8, 16]},
                     {"batch": [1, 1, 1], "seq": [1, 1, 8], "past": [0, 4, 8]}],
        "workspace_mib": None, "optimization_level": 3, "timing_cache": None, "architectures": ["sm86"],
        "typing": "weak", "int8_mode": "explicit", "calibration_cache": None,
        "layer_precisions": [{"pattern": "fc2", "dtype": "bf16"}], "plugins": [{"library": "libx.so", "module": None}],
    }


@pytest.mark.parametrize(("change", "message"), [
    ({"optimisation_level": 1}, r"unknown key 'optimisation_level' at \$; allowed: backend, .*"
                                r"did you mean 'optimization_level'"),
    ({"profiles": [{"batch": [1, 1, 1], "seq": [1, 1, 1], "bach": [1, 1, 1]}]},
     r"unknown key 'bach' at \$\.profiles\[0\]; allowed: batch, seq, past; did you mean 'batch'"),
    ({"plugins": [{"library": "a.so", "module": None, "libary": "b.so"}]},
     r"unknown key 'libary' at \$\.plugins\[0\]; allowed: library, module; did you mean 'library'"),
    ({"layer_precisions": [{"pattern": "x", "dtype": "fp16", "dtpye": "fp16"}]},
     r"unknown key 'dtpye' at \$\.layer_precisions\[0\]; allowed: pattern, dtype"),
    ({"profiles": [{"batch": [1, 2, 3, 4], "seq": [1, 1, 1]}]}, r"at most length 3.*\$\.profiles\[0\]\.batch"),
    ({"optimization_level": "3"}, r"Expected `int`, got `str` at \$\.optimization_level"),
    ({"backend": "tensorrtx"}, r"'tensorrtx' is not allowed at \$\.backend; allowed: auto, tensorrt, tensorrt-rtx"),
    ({"optimization_level": 9}, "optimization level 9 not in 0..5"),  # __post_init__ runs on decoding too
    ({"architectures": ["sm90"]}, "unknown GPU architecture 'sm90'"),
    ({"version": 2}, "build options version 2 not supported; expected 1"),
    ({"version": None}, "build options version None not supported; expected 1"),
])
def test_options_from_dict_is_strict(change: dict[str, object], message: str) -> None:
    data = {**BuildOptions(typing=Typing.WEAK).to_dict(), **change}
    if "version" in change and change["version"] is None:
        del data["version"]
    with pytest.raises(ConfigError, match=message) as info:
        BuildOptions.from_dict(data)
    assert info.value.exit_code == 2


def test_enum_fields_given_as_plain_strings_become_members() -> None:
    options = BuildOptions(backend="tensorrt", typing="weak", int8_mode="implicit",  # type: ignore[arg-type]
                           calibration_cache="c.cache")
    assert options.backend is BackendName.TENSORRT and options.typing is Typing.WEAK
    assert options.int8_mode is Int8Mode.IMPLICIT
    with pytest.raises(ConfigError, match=r"unknown network typing 'strnog'.*did you mean 'strong'"):
        BuildOptions(typing="strnog")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="did you mean 'tensorrt-rtx'"):
        BuildOptions(backend="tensorrt_rtx")  # type: ignore[arg-type]
