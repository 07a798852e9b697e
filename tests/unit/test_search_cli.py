"""``build-engine search`` end to end on a toy BERT: outputs, the recipe's round trip through ``quantize``,
resume, determinism and the exit codes of an unmet budget."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from builder.cli.main import main

FAST = ["--samples", "16", "--slice", "32", "--quick", "16", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx

    from builder.intake.minilm import tokenizer_json_path
    from tests.toygraphs import bert_block_model

    folder = tmp_path_factory.mktemp("search-toy")
    path = folder / "toy.onnx"
    onnx.save(bert_block_model(layers=1, hidden=32), str(path))
    shutil.copyfile(tokenizer_json_path(), folder / "tokenizer.json")
    return path


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def searched(toy_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("search-out") / "out"
    code, out, err = cli("search", str(toy_model), "--budget", "cosine>=0.99995", "--presets", "hero-m1,int8-gemm",
                         "--test-samples", "32", "-o", str(folder), *FAST)
    assert code == 0, err
    return folder, out


def _points(folder: Path) -> list[dict[str, object]]:
    return list(json.loads((folder / "candidates.json").read_text())["points"])


def test_the_search_writes_every_output(searched: tuple[Path, str]) -> None:
    folder, out = searched
    for name in ("recipe.yaml", "model.onnx", "plan.json", "precision.json", "candidates.json", "candidates.md",
                 "pareto.png", "search.json", "test-report.json", "journal.jsonl", "statistics.npz"):
        assert (folder / name).is_file(), name
    assert (folder / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((folder / "search.json").read_text())
    assert report["met"] is True and report["stop"] == "done"
    assert report["answer"]["measurement"]["metrics"]["cosine"] >= 0.99995
    assert report["test"]["cosine"] > 0.99 and report["test_split"] == "VADER test split"
    assert report["timing"]["new_evaluations"] == len([p for p in _points(folder) if p["phase"] != "preset"])
    assert {p["label"] for p in _points(folder) if p["phase"] == "preset"} == {"hero-m1", "int8-gemm"}
    assert "answer: INT8 share" in out and "test split" in out
    table = (folder / "candidates.md").read_text()
    assert "| bisection |" in table and "preset hero-m1" in table


def test_quantize_with_the_found_recipe_reproduces_the_plan(searched: tuple[Path, str], toy_model: Path,
                                                             tmp_path: Path) -> None:
    folder, _ = searched
    out = tmp_path / "quantized"
    code, _, err = cli("quantize", str(toy_model), "--statistics", str(folder), "--recipe",
                       str(folder / "recipe.yaml"), "-o", str(out))
    assert code == 0, err
    assert (out / "plan.json").read_text() == (folder / "plan.json").read_text()
    assert (out / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes()


def test_a_rerun_resumes_from_the_journal_and_measures_nothing_new(searched: tuple[Path, str], toy_model: Path,
                                                                   tmp_path: Path) -> None:
    folder, _ = searched
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = (copy / "journal.jsonl").read_text()
    code, out, err = cli("search", str(toy_model), "--budget", "cosine>=0.99995", "--presets", "hero-m1,int8-gemm",
                         "--no-test", "-o", str(copy), *FAST)
    assert code == 0, err
    assert "resuming:" in out and "0 candidates measured" in out
    assert (copy / "journal.jsonl").read_text() == before
    again, first = _points(copy), _points(folder)
    assert [(p["key"], p["measurement"]) for p in again] == [(p["key"], p["measurement"]) for p in first]
    assert all(p["reused"] for p in again)


def test_a_fresh_run_is_deterministic(searched: tuple[Path, str], toy_model: Path, tmp_path: Path) -> None:
    folder, _ = searched
    out = tmp_path / "fresh"
    code, _, err = cli("search", str(toy_model), "--budget", "cosine>=0.99995", "--presets", "none", "--no-test",
                       "-o", str(out), *FAST)
    assert code == 0, err

    def figures(points: list[dict[str, object]]) -> list[tuple[object, object, object]]:
        return [(p["key"], p["measurement"]["share"], p["measurement"]["metrics"])  # type: ignore[index]
                for p in points if p["phase"] != "preset"]

    assert figures(_points(out)) == figures(_points(folder))
    assert (out / "recipe.yaml").read_text() == (folder / "recipe.yaml").read_text()


def test_an_impossible_budget_exits_3_naming_the_gap(toy_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "impossible"
    code, _, err = cli("search", str(toy_model), "--budget", "cosine>=1", "--presets", "none", "--no-test", "-o",
                       str(out), *FAST)
    assert code == 3, err
    assert "budget cosine>=1 not met even with every unit in 16 bits" in err and "short of 1" in err
    report = json.loads((out / "search.json").read_text())
    assert report["met"] is False and report["feasible"] is False
    assert (out / "recipe.yaml").is_file() and report["answer"]["phase"] == "floor"


def test_a_search_stopped_before_a_point_meets_the_budget_exits_3(toy_model: Path, tmp_path: Path) -> None:
    code, _, err = cli("search", str(toy_model), "--budget", "cosine>=0.99995", "--presets", "none", "--no-test",
                       "--max-evals", "1", "-o", str(tmp_path / "cut"), *FAST)
    assert code == 3, err
    assert "before the search finished (max-evals)" in err


@pytest.mark.parametrize(("budget", "needle"), [
    ("perplexity<=+2%", "needs a causal language model"),
    ("cosine>=2", "must lie in [0, 1]"),
    ("accuracy>=0.9", "with a metric among cosine, cosine-min, probe-drop, perplexity, top1"),
])
def test_a_bad_budget_exits_2_naming_the_allowed_metrics(toy_model: Path, tmp_path: Path, budget: str,
                                                         needle: str) -> None:
    code, _, err = cli("search", str(toy_model), "--budget", budget, "-o", str(tmp_path / "bad"), *FAST)
    assert code == 2 and needle in err, err
    if "needs a" in needle:
        assert "cosine>=0.999" in err and "probe-drop<=0.1" in err


def test_the_unmet_message_shows_enough_digits_to_tell_value_and_bound_apart() -> None:
    from builder.cli.search import distinct

    assert distinct(0.999999893671468, 0.9999999) == ("0.99999989", "0.9999999")
    assert distinct(0.99902, 0.999) == ("0.99902", "0.999")
    value, bound = distinct(1.0 - 3e-12, 1.0)
    assert value != bound and float(value) < float(bound)


OPTQ_BASE = """\
version: 2
name: toy-optq
defaults: {precision: fp32}
rules:
  - select: {roles: [q_proj, k_proj, v_proj, attn_out, fc1, fc2]}
    set: {precision: int8, activation: {quantizer: smooth, alpha: 0.8}, weight: {quantizer: optq, bits: 8}}
"""


def test_an_optq_base_collects_the_hessians_resumes_and_quantize_reproduces_it(toy_model: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "toy-optq.yaml"
    recipe.write_text(OPTQ_BASE, encoding="utf-8")
    argv = ["search", str(toy_model), "--recipe", str(recipe), "--budget", "cosine>=0.9999", "--presets", "none",
            "--no-test", "-o", str(tmp_path / "out"), *FAST]
    code, out, err = cli(*argv)
    assert code in (0, 3), err
    assert (tmp_path / "out" / "hessians.npz").is_file()
    assert "weight statistics: hessian of 4 GEMM inputs" in out  # Q, K and V read one tensor
    model = (tmp_path / "out" / "model.onnx").read_bytes()
    code2, out2, err2 = cli(*argv)
    assert code2 == code, err2
    assert "0 candidates measured" in out2 and (tmp_path / "out" / "model.onnx").read_bytes() == model
    quantized = tmp_path / "quantized"
    code, _, err = cli("quantize", str(toy_model), "--statistics", str(tmp_path / "out"), "--recipe",
                       str(tmp_path / "out" / "recipe.yaml"), "-o", str(quantized), "--samples", "16",
                       "--batch-size", "8")
    assert code == 0, err
    assert (quantized / "model.onnx").read_bytes() == model
