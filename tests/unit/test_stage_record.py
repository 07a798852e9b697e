"""stages.json (StageKeys / StageRecord): reuse bookkeeping as a strict, versioned file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.cli.steps import STAGES_FILE, StageKeys, StageRecord, stage_key
from calib.errors import ConfigError


def test_record_persists_and_fresh_needs_key_and_outputs(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"x")
    key = stage_key(model="a", recipe="int8-gemm")
    StageRecord(tmp_path).record("quantize", key)
    again = StageRecord(tmp_path)
    assert again.fresh("quantize", key, [out])
    assert not again.fresh("quantize", stage_key(model="b", recipe="int8-gemm"), [out])
    assert not again.fresh("calibrate", key, [out])
    assert not again.fresh("quantize", key, [out, tmp_path / "plan.json"])  # a missing output is never reused
    assert json.loads((tmp_path / STAGES_FILE).read_text()) == {"steps": {"quantize": key}, "version": 2}


def test_round_trip() -> None:
    keys = StageKeys(steps={"calibrate": "1" * 64, "quantize": "2" * 64})
    assert StageKeys.from_json(keys.to_json()) == keys


@pytest.mark.parametrize(("text", "match"), [
    ('{"version": 2, "steps": {}, "step": {}}', r"unknown key 'step' at \$; allowed: steps, version; did you mean"),
    ('{"version": 2, "steps": {"quantize": 5}}', r"Expected `str`, got `int` at \$\.steps\[\.\.\.\]"),
    ('{"version": 3, "steps": {}}', "version 3 not supported; expected 2"),
    ('{"calibrate": "abc"}', r"version 1 \(a flat step -> key object\) not supported; expected 2"),
    ("{", "not valid JSON"),
])
def test_stage_keys_are_strict(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        StageKeys.from_json(text)


def test_an_old_or_damaged_file_means_every_step_runs_again(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / STAGES_FILE).write_text('{"calibrate": "abc", "quantize": "def"}\n')  # what version 1 wrote
    record = StageRecord(tmp_path)
    assert "version 1" in caplog.text and "runs afresh" in caplog.text
    assert not record.fresh("calibrate", "abc", [])  # nothing it cannot vouch for is reused
    record.record("calibrate", "abc")
    assert StageRecord(tmp_path).fresh("calibrate", "abc", [])  # rewritten in the current version
