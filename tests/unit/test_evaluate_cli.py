"""`build-engine evaluate` end to end on a toy encoder (small real-text subsets), and its input errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest

from builder.cli.main import main
from builder.evaluate.report import AccuracyReport
from builder.graph.analyze import analyze
from builder.graph.report import Role
from builder.intake.minilm import tokenizer_json_path
from tests.unit.test_evaluate_runner import perturbed, pooled_toy

SMALL = ["--test-samples", "40", "--train-samples", "120", "--layer-sentences", "8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("evaluate")
    toy = pooled_toy()
    fc2 = analyze(toy).find(Role.FC2, 0)
    assert fc2 is not None and fc2.weight is not None
    ref, damaged = folder / "fp32.onnx", folder / "damaged" / "model.onnx"
    damaged.parent.mkdir()
    onnx.save(toy, str(ref))
    # the toy embeds MiniLM's vocabulary: its tokenizer sits beside the reference, as a user's would
    shutil.copy(tokenizer_json_path(), folder / "tokenizer.json")
    onnx.save(perturbed(toy, fc2.weight, scale=0.2), str(damaged))
    return ref, damaged


def test_evaluate_prints_table_and_writes_report(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref, damaged = models
    out = tmp_path / "report.json"
    assert main(["evaluate", str(damaged), "--reference", str(ref), *SMALL, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "probe accuracy (FP32 probe)" in printed and "per-layer error" in printed
    report = AccuracyReport.from_json(out.read_text())
    assert report.model_name == "damaged"  # engines/<name>/model.onnx -> <name>
    assert report.sentence is not None
    assert (report.sentence.num_test, report.sentence.num_train, report.sentence.num_pairs) == (40, 120, 1225)
    assert report.sentence.cosine_mean < 1.0
    errors = {(e.layer, e.point): e.relative_error for e in report.layer_errors}
    assert errors[(0, "attn")] == 0.0 and errors[(0, "block")] > 0.0  # type: ignore[operator]


def test_evaluate_model_against_itself_is_exact(models: tuple[Path, Path], tmp_path: Path) -> None:
    ref, _ = models
    out = tmp_path / "self.json"
    assert main(["evaluate", str(ref), "--reference", str(ref), *SMALL, "--no-refit", "-o", str(out)]) == 0
    report = AccuracyReport.from_json(out.read_text())
    assert report.sentence is not None
    assert report.sentence.cosine_min == pytest.approx(1.0, abs=1e-6)
    assert report.sentence.probe_accuracy == report.sentence.reference_probe_accuracy
    assert report.sentence.spearman == report.sentence.reference_spearman
    assert report.sentence.probe_accuracy_refit is None
    assert all(e.relative_error == 0.0 for e in report.layer_errors)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--test-samples", "0"], "--test-samples must be a positive count"),
        (["--train-samples", "5"], "too few to fit the probe"),
        (["--graph-report", "missing.json"], "does not exist"),
    ],
)
def test_bad_flags_exit_2(
    models: tuple[Path, Path], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ref, damaged = models
    assert main(["evaluate", str(damaged), "--reference", str(ref), *extra]) == 2
    assert message in capsys.readouterr().err


def test_missing_reference_exits_2(models: tuple[Path, Path], tmp_path: Path) -> None:
    _, damaged = models
    out = tmp_path / "never.json"
    assert main(["evaluate", str(damaged), "--reference", str(tmp_path / "nope.onnx"), "-o", str(out)]) == 2
    assert not out.exists()
