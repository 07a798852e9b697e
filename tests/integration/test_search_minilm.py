"""Precision search on the bundled MiniLM (slow): ``cosine>=0.999`` on held-out sentences, 512 VADER calibration
sentences, answer checked on the test split; a re-run resumes from the journal and measures nothing new.

The base recipe is the preset mix that measured best per role on the search slice (SmoothQuant inputs for the
weight GEMMs as in smooth-w8a8, HERO's static INT8 Q.K^T and P.V): from it the search reaches more INT8 than
from hero-m3, whose FC1/FC2 inputs cost more accuracy per multiply-accumulate (see the README section). Its
weights are rounded by OPTQ (Frantar et al. 2022, arXiv 2210.17323), which leaves about a third of
round-to-nearest's weight damage on the search slice; the search collects the Hessians once and keeps
quantized weights across candidates (builder.search.weightcache). The acceptance of the search: at least 80%
of the GEMM multiply-accumulates in INT8 with mean cosine >= 0.999 on the test split, found in under ten
minutes on 2 cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from builder.cli.main import main

pytestmark = pytest.mark.slow

MIXED = """\
version: 2
name: smooth-attn-optq
description: smooth-w8a8's weight GEMMs plus hero-m3's INT8 attention batched MatMuls, OPTQ W8 weights
defaults: {precision: fp32}
rules:
  - select: {roles: [q_proj, k_proj, v_proj, fc1, fc2]}
    set: {precision: int8, activation: {quantizer: smooth, alpha: 0.9}}
  - select: {roles: [fc2]}
    set: {activation: {quantizer: smooth, alpha: 0.9, clip: 0.8}}
  - select: {roles: [attn_out]}
    set: {precision: int8, activation: {quantizer: static, range: max}}
  - select: {roles: [attn_qk, attn_pv]}
    set: {precision: int8, activation: {quantizer: static, range: max}}
  - select: {roles: [q_proj, k_proj, v_proj, attn_out, fc1, fc2]}
    set: {weight: {quantizer: optq, bits: 8}}
"""


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def searched(minilm_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[str]]:
    folder = tmp_path_factory.mktemp("minilm-search")
    recipe = folder / "smooth-attn-optq.yaml"
    recipe.write_text(MIXED, encoding="utf-8")
    argv = ["search", str(minilm_onnx), "--recipe", str(recipe), "--budget", "cosine>=0.999", "--presets",
            "hero-m1,hero-m3,smooth-mp,smooth-w8a8", "--no-progress", "-o", str(folder / "out")]
    code, _, err = _cli(*argv)
    assert code == 0, err
    return folder / "out", json.loads((folder / "out" / "search.json").read_text()), argv


def test_the_answer_meets_the_budget_on_the_slice_and_the_test_split_with_80_percent_int8(
        searched: tuple[Path, dict[str, Any], list[str]]) -> None:
    _, report, _ = searched
    answer = report["answer"]["measurement"]
    assert report["met"] and answer["metrics"]["cosine"] >= 0.999 and answer["samples"] == 512
    assert report["test"]["cosine"] >= 0.999  # the acceptance: the budget holds on the test split too
    assert report["test"]["int8_gemm_share"] == pytest.approx(answer["share"], abs=1e-9)
    assert answer["share"] >= 0.80


def test_the_answer_has_more_int8_than_every_preset_that_meets_the_budget(
        searched: tuple[Path, dict[str, Any], list[str]]) -> None:
    folder, report, _ = searched
    presets = [p for p in json.loads((folder / "candidates.json").read_text())["points"] if p["phase"] == "preset"]
    meeting = [p for p in presets if p["measurement"]["metrics"]["cosine"] >= 0.999]
    assert {p["label"] for p in presets} == {"hero-m1", "hero-m3", "smooth-mp", "smooth-w8a8"}
    assert meeting, "hero-m1 meets cosine >= 0.999 on held-out sentences"
    assert report["answer"]["measurement"]["share"] > max(p["measurement"]["share"] for p in meeting)


def test_the_search_takes_under_ten_minutes_on_an_unloaded_machine(
        searched: tuple[Path, dict[str, Any], list[str]]) -> None:
    timing = searched[1]["timing"]
    found_in = timing["prepare_s"] + timing["search_s"]
    if max(timing["load_start"][0], timing["load_end"][0]) > (os.cpu_count() or 1):
        pytest.skip(f"the machine was loaded (load {timing['load_start'][0]:.1f} on {timing['cpus']} CPUs); "
                    f"found in {found_in:.0f} s")
    assert found_in < 600


def test_a_rerun_resumes_and_reproduces_the_recipe(searched: tuple[Path, dict[str, Any], list[str]]) -> None:
    folder, _, argv = searched
    recipe = (folder / "recipe.yaml").read_text()
    code, out, err = _cli(*argv, "--no-test")
    assert code == 0, err
    assert "0 candidates measured" in out and (folder / "recipe.yaml").read_text() == recipe
