"""The GraphReport artifact: a frozen, versioned msgspec Schema; strict decoding names the bad key or value."""

from __future__ import annotations

import json

import msgspec
import pytest

from builder.graph.analyze import analyze
from builder.graph.report import REPORT_VERSION, GraphReport, Role, RoleAssignment
from calib.errors import ConfigError
from tests.toy_llama import llama_block_model
from tests.toygraphs import bert_block_model


def _data() -> dict[str, object]:
    return dict(json.loads(analyze(llama_block_model(layers=1), name="toy").to_json()))


def test_version_is_bumped_and_checked() -> None:
    data = _data()
    assert data["version"] == REPORT_VERSION == 2
    data["version"] = 1
    with pytest.raises(ConfigError, match="GraphReport version 1 not supported; expected 2"):
        GraphReport.from_json(json.dumps(data))


def test_unknown_keys_are_rejected_with_the_allowed_ones() -> None:
    data = _data()
    data["layer_count"] = 1
    with pytest.raises(ConfigError, match=r"unknown key 'layer_count' at \$; allowed: .*num_layers"):
        GraphReport.from_json(json.dumps(data))
    data = _data()
    data["assignments"][0]["weigth"] = "w"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"unknown key 'weigth' at \$\.assignments\[0\].*did you mean 'weight'"):
        GraphReport.from_json(json.dumps(data))


@pytest.mark.parametrize(("path", "value"), [(("architecture",), "t5"), (("assignments", 0, "role"), "fc3"),
                                             (("assignments", 0, "operands"), ["q", "x"]), (("num_layers",), "2")])
def test_bad_values_are_rejected(path: tuple[str | int, ...], value: object) -> None:
    data = _data()
    target: object = data
    for key in path[:-1]:
        target = target[key]  # type: ignore[index]
    target[path[-1]] = value  # type: ignore[index]
    with pytest.raises(ConfigError, match="GraphReport"):
        GraphReport.from_json(json.dumps(data))


def test_frozen_and_role_is_a_str_enum() -> None:
    report = analyze(bert_block_model(layers=1), name="toy")
    with pytest.raises(AttributeError):
        report.num_layers = 3  # type: ignore[misc]
    assert isinstance(report.assignments[0].role, Role) and Role.GATE_PROJ == "gate_proj"
    assert not report.pre_norm and analyze(llama_block_model(layers=1)).pre_norm
    assert isinstance(report.assignments[0], RoleAssignment) and isinstance(report, msgspec.Struct)
