"""Plugin node attributes (plugins.common.PluginAttributes): ONNX attributes and JSON, for every plugin's class."""

from __future__ import annotations

from typing import Any

import pytest
from onnx import AttributeProto, helper

from calib.errors import GraphError
from plugins.common import DOMAIN, PLUGIN_NAMESPACE, PLUGIN_VERSION, PluginAttributes
from plugins.layernorm_quant.schema import LayerNormQuantizeAttrs
from plugins.softmax_quant.schema import SoftmaxQuantizeAttrs
from plugins.sparq_quant.schema import SparqQuantizeAttrs

# one instance of each class with every optional field away from its default (floats exact in float32: FLOAT
# attributes are float32)
VALUES: list[PluginAttributes] = [
    LayerNormQuantizeAttrs(epsilon=2.0**-20, scale=0.03125, per_token=True, has_residual=True, emit_normalized=True),
    SoftmaxQuantizeAttrs(scale=0.25, has_mask=True),
    SparqQuantizeAttrs(scale=0.125, window_bits=4, placements=3, round_nearest=False, vsparq=True),
]
ONNX_KIND = {AttributeProto.FLOAT: "FLOAT", AttributeProto.INT: "INT", AttributeProto.STRING: "STRING"}


def _read_back(value: PluginAttributes) -> dict[str, Any]:
    """The node's attributes as an ONNX reader sees them (kind checked against ATTRIBUTE_KINDS)."""
    node = helper.make_node(value.OP_TYPE, ["x"], ["y"], name="node", domain=DOMAIN, **value.to_onnx_attributes())
    kinds = type(value).attribute_kinds()
    out = {}
    for attr in node.attribute:
        assert ONNX_KIND[attr.type] == kinds[attr.name], attr.name
        read = helper.get_attribute_value(attr)
        out[attr.name] = read.decode() if isinstance(read, bytes) else read
    return out


@pytest.mark.parametrize("value", VALUES, ids=lambda v: v.OP_TYPE)
def test_onnx_attributes_round_trip(value: PluginAttributes) -> None:
    read = _read_back(value)
    assert read["plugin_version"] == PLUGIN_VERSION and read["plugin_namespace"] == PLUGIN_NAMESPACE
    assert set(read) == set(type(value).attribute_kinds())
    assert type(value).from_onnx_attributes(read) == value
    assert type(value).from_json(value.to_json()) == value


@pytest.mark.parametrize("value", VALUES, ids=lambda v: v.OP_TYPE)
def test_absent_optional_attributes_take_the_defaults(value: PluginAttributes) -> None:
    cls = type(value)
    required = {"LayerNormQuantize": {"epsilon": 1e-5}, "SoftmaxQuantize": {},
                "SparqQuantize": {"scale": 0.5, "window_bits": 4, "placements": 2}}[value.OP_TYPE]
    assert cls.from_onnx_attributes(required) == cls(**required)


def test_missing_required_attributes_are_named() -> None:
    with pytest.raises(GraphError, match=r"LayerNormQuantize needs the attribute\(s\) epsilon"):
        LayerNormQuantizeAttrs.from_onnx_attributes({"scale": 0.1})
    with pytest.raises(GraphError, match="window_bits, placements"):
        SparqQuantizeAttrs.from_onnx_attributes({"scale": 0.1})


@pytest.mark.parametrize(("cls", "attrs", "message"), [
    (SoftmaxQuantizeAttrs, {"has_mask": 2}, "has_mask"),
    (LayerNormQuantizeAttrs, {"epsilon": 1e-5, "per_tokn": 1}, "unknown attribute 'per_tokn'.*per_token"),
    (SoftmaxQuantizeAttrs, {"plugin_version": "2"}, "plugin_version '2'"),
    (SoftmaxQuantizeAttrs, {"scale": -1.0}, "scale"),
])
def test_bad_attributes_raise_graph_errors(cls: type[PluginAttributes], attrs: dict[str, Any], message: str) -> None:
    with pytest.raises(GraphError, match=message):
        cls.from_onnx_attributes(attrs)


def test_a_foreign_schema_version_is_refused() -> None:
    with pytest.raises(GraphError, match="schema version 2 is not supported; use 1"):
        SoftmaxQuantizeAttrs(version=2)
