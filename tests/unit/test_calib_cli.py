"""``build-engine calibrate`` end to end on a toy BERT graph with real text."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from builder.cli.main import main
from calib.cache import parse_cache
from calib.data import vader_splits
from calib.range_table import RangeTable
from tests.toygraphs import bert_block_model


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    model = folder / "toy.onnx"
    onnx.save(bert_block_model(layers=2), str(model))
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
    assert table.num_samples == 24 and all(r.percentile == 99.9 for r in table.ranges.values())
    cache = parse_cache((tmp_path / "calibration.cache").read_text())
    assert set(cache.scales) == set(table.ranges)
    assert (tmp_path / "outliers.md").is_file() and (tmp_path / "outliers_fc2.png").is_file()
    assert "wrote" in capsys.readouterr().out
    assert main(args) == 0  # the finished collection is reused
    assert "reused 3 of 3 batches" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "percentile"], "needs --percentile"),
    (["--data", "nope.txt"], "neither a known source"),
    (["--granularity", "group", "--groups", "5"], "must divide the hidden size 32"),
])
def test_bad_flags_exit_with_a_clear_message(toy: tuple[Path, Path], tmp_path: Path, extra: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    model, texts = toy
    args = ["calibrate", str(model), "--calib-data", str(texts), "--samples", "8", "--no-progress", "-o", str(tmp_path),
            *extra]
    assert main(args) in (2, 3)
    assert message in capsys.readouterr().err
