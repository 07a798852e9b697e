"""``build-engine calibrate`` end to end on a toy BERT graph with real text."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest

from builder.cli.main import main
from builder.intake.minilm import tokenizer_json_path
from calib.cache import parse_cache
from calib.data import calibration_texts, vader_splits
from calib.range_table import RangeTable
from tests.toygraphs import bert_block_model


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    model = folder / "toy.onnx"
    onnx.save(bert_block_model(layers=2, hidden=48), str(model))  # 48: every preset applies (PEG K=6)
    shutil.copy(tokenizer_json_path(), folder / "tokenizer.json")  # the toy's vocabulary is BERT's, as a user ships it
    texts = folder / "texts.txt"
    texts.write_text("\n".join(s.text for s in vader_splits(0, 24).calibration), encoding="utf-8")
    return model, texts


def test_calibrate_writes_ranges_cache_state_and_report(toy: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model, texts = toy
    args = ["calibrate", str(model), "--calib-data", str(texts), "--samples", "24", "--batch-size", "8",
            "--method", "percentile", "--percentile", "99.9", "--report", "--no-progress", "-o", str(tmp_path)]
    assert main(args) == 0
    table = RangeTable.from_json((tmp_path / "ranges.json").read_text())
    assert table.num_samples == len(calibration_texts(str(texts), 24, 0))
    assert all(r.percentile == 99.9 for r in table.ranges.values())
    cache = parse_cache((tmp_path / "calibration.cache").read_text())
    assert set(cache.scales) == set(table.ranges)
    assert (tmp_path / "outliers.md").is_file() and (tmp_path / "outliers_fc2.png").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main(args) == 0  # the finished collection is reused
    assert "reused" in capsys.readouterr().out


def test_one_calibration_serves_every_preset(toy: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """calibrate once (any --method), then quantize with every preset from that folder: no second calibration.
    Observers calibration leaves to the recipes that need them (vSPARQ's zero pairs) are collected by quantize
    from the same data, given by the same flags; statistics.npz stays as calibrate wrote it."""
    from builder.recipes.loader import preset_names

    model, texts = toy
    calibration = tmp_path / "calibration"
    assert main(["calibrate", str(model), "--calib-data", str(texts), "--samples", "16", "--method", "entropy",
                 "--no-progress", "-o", str(calibration)]) == 0
    state = (calibration / "statistics.npz").read_bytes()
    capsys.readouterr()
    for preset in preset_names():
        out = tmp_path / preset
        assert main(["quantize", str(model), "--statistics", str(calibration), "--recipe", preset,
                     "--calib-data", str(texts), "--samples", "16", "-o", str(out)]) == 0, capsys.readouterr().err
        assert (out / "model.onnx").is_file() and (out / "plan.json").is_file()
    assert (calibration / "statistics.npz").read_bytes() == state  # read only, never recollected
    assert "calibrat" not in capsys.readouterr().err


@pytest.mark.parametrize(("edit", "where", "key", "allowed"), [
    ('"offset"', "plan", "ofset", "allowed: amax, offset, centered"),
    ('"method"', "plan", "methd", "did you mean 'method'"),
    ("range: max", "recipe", "rnage", "allowed: range, percentile"),
    ("select:", "recipe", "selct", "allowed keys: note, select, set"),
])
def test_unknown_keys_in_a_plan_or_recipe_exit_2_naming_the_key(
        toy: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: str, where: str, key: str,
        allowed: str) -> None:
    from importlib.resources import files

    model, texts = toy
    assert main(["calibrate", str(model), "--calib-data", str(texts), "--samples", "8", "--no-progress",
                 "-o", str(tmp_path)]) == 0
    if where == "plan":
        assert main(["quantize", str(model), "--statistics", str(tmp_path), "-o", str(tmp_path / "q")]) == 0
        text = (tmp_path / "q" / "plan.json").read_text()
        bad = tmp_path / "bad.json"
        bad.write_text(text.replace(edit, f'"{key}"', 1))
        flags = ["--plan", str(bad)]
    else:
        text = files("builder.recipes.presets").joinpath("int8-gemm.yaml").read_text()
        bad = tmp_path / "bad.yaml"
        bad.write_text(text.replace(edit, edit.replace(edit.split(":")[0], key), 1))
        flags = ["--recipe", str(bad)]
    capsys.readouterr()
    assert main(["quantize", str(model), "--statistics", str(tmp_path), *flags, "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"unknown key '{key}'" in err and allowed in err and "Traceback" not in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "percentile"], "needs a percentile"),
    (["--data", "nope.txt"], "neither a known source"),
    (["--bins", "1000"], "must be a power of two"),
])
def test_bad_flags_exit_with_a_clear_message(toy: tuple[Path, Path], tmp_path: Path, extra: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    model, texts = toy
    args = ["calibrate", str(model), "--calib-data", str(texts), "--samples", "8", "--no-progress", "-o", str(tmp_path),
            *extra]
    assert main(args) in (2, 3)
    assert message in capsys.readouterr().err
