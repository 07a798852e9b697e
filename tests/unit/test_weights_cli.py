"""The weight flag group (``--weights``, ``--weight-bits`` ... ``--weight-only``) of ``quantize`` and the one-shot.

A toy BERT file with real VADER texts: bad options exit 2 before any work (before the model or the statistics
are read); a block that does not divide a GEMM's K exits 2 naming the GEMM; ``quantize --weights optq`` adds
the Hessians it lacks in one resumable pass (OUTPUT/hessians.npz, reused by a re-run) and refuses other
calibration texts; the flags keep the recipe's bits and block unless told otherwise.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import onnx
import pytest

from builder.cli.common import add_weight_arguments, weight_flags
from builder.cli.main import main
from builder.graph.analyze import analyze
from builder.graph.report import Role
from builder.intake.minilm import tokenizer_json_path
from builder.quant.none import NoneConfig
from builder.quant.optq import OptqConfig
from builder.quant.rtn import RtnConfig
from builder.recipes.model import Precision, Recipe, Rule, Selector, Settings
from calib.data import vader_splits
from calib.errors import ConfigError
from tests.toygraphs import bert_block_model


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("weights-cli")
    model = folder / "toy.onnx"
    onnx.save(bert_block_model(layers=1, hidden=48, heads=2, ffn=96), str(model))
    shutil.copy(tokenizer_json_path(), folder / "tokenizer.json")
    texts = folder / "texts.txt"
    texts.write_text("\n".join(s.text for s in vader_splits(0, 24).calibration), encoding="utf-8")
    calibration = folder / "calibration"
    assert main(["calibrate", str(model), "--calib-data", str(texts), "--samples", "16", "--batch-size", "8",
                 "--no-progress", "-o", str(calibration)]) == 0
    return model, texts, calibration


@pytest.mark.parametrize(("flags", "message"), [
    (["--weights", "rtn", "--tile", "64"], "--tile is an option of optq and gpfq"),
    (["--weight-bits", "4"], "--weight-bits needs --weights"),
    (["--weight-only"], "--weight-only needs --weights"),
    (["--weights", "optq", "--weight-bits", "9"], "outside 2..8"),
    (["--weights", "rtn", "--weight-bits", "1"], "outside 2..8"),
    (["--weights", "gpfq", "--weight-bits", "4", "--accumulator-bits", "8"], "one-element dot product"),
    (["--weights", "optq", "--weight-only", "--accumulator-bits", "16"], "--weight-only GEMMs read float"),
])
def test_bad_weight_flags_exit_2_before_the_model_is_read(flags: list[str], message: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.onnx"  # never read: the flags fail first
    assert main(["quantize", str(missing), "--statistics", str(tmp_path), "-o", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_block_that_does_not_divide_k_exits_2_naming_the_gemm(toy: tuple[Path, Path, Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model, _, _ = toy
    code = main(["quantize", str(model), "--statistics", str(tmp_path / "absent"), "--weights", "rtn",
                 "--weight-bits", "4", "--weight-block", "32", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "does not divide K=48" in err and "GEMM" in err  # before the statistics are looked for


def test_quantize_adds_the_hessians_it_lacks_once(toy: tuple[Path, Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model, texts, calibration = toy
    out = tmp_path / "optq"
    args = ["quantize", str(model), "--statistics", str(calibration), "--calib-data", str(texts), "--samples", "16",
            "--batch-size", "8", "--recipe", "int8-gemm", "--weights", "optq", "--weight-bits", "4", "-o", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    hessians = (out / "hessians.npz").read_bytes()
    first = (out / "model.onnx").read_bytes()
    assert "2/2" in capsys.readouterr().err  # the pass ran over both batches
    assert main(args) == 0
    assert "2/2" not in capsys.readouterr().err  # the finished pass is reused: the model does not run again
    assert (out / "hessians.npz").read_bytes() == hessians and (out / "model.onnx").read_bytes() == first
    other = [*args[:-1], str(tmp_path / "other")]
    other[other.index("--samples") + 1] = "8"
    assert main(other) == 2
    assert "calibration-data flags the statistics were collected with" in capsys.readouterr().err


def _args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_weight_arguments(parser.add_argument_group("weights"))
    return parser.parse_args(list(flags))


def test_weight_flags_keep_the_recipes_bits_and_block_unless_told() -> None:
    report = analyze(bert_block_model(layers=1, hidden=64, heads=2, ffn=128), name="toy_bert")
    roles = (Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_OUT, Role.FC1, Role.FC2)
    recipe = Recipe(name="w4", rules=(Rule(select=Selector(roles=roles), set=Settings(
        precision=Precision.INT8, activation=NoneConfig(), weight=RtnConfig(bits=4, block=32))),))

    def weight_of(*flags: str) -> object:
        flags_ = weight_flags(_args(*flags))
        assert flags_ is not None
        return flags_.apply(recipe, report).rules[-1].set.weight

    assert weight_of("--weights", "optq") == OptqConfig(bits=4, block=32, scale="max")  # the recipe's scale
    assert weight_of("--weights", "optq", "--weight-bits", "3", "--act-order") == OptqConfig(bits=3, block=32,
                                                                                              scale="max")
    assert weight_of("--weights", "optq", "--no-act-order", "--weight-scale", "mse") == OptqConfig(
        bits=4, block=32, act_order=False, scale="mse")
    assert OptqConfig().act_order and OptqConfig().scale == "auto"  # OPTQ's own defaults
    # auto: MSE scales, but max under an accumulator constraint (smaller scales would spend AXE's integer budget)
    assert OptqConfig().resolved_scale == "mse" and OptqConfig(accumulator_bits=16).resolved_scale == "max"
    assert OptqConfig(accumulator_bits=16, scale="mse").resolved_scale == "mse"  # said explicitly: kept
    assert RtnConfig(scale="auto").resolved_scale == "max"
    assert weight_of("--weights", "optq", "--weight-scale", "auto") == OptqConfig(bits=4, block=32)
    assert weight_of("--weights", "rtn", "--weight-bits", "8", "--weight-block", "0") == RtnConfig(bits=8)
    assert weight_flags(_args()) is None
    mixed = recipe.with_rules((Rule(select=Selector(roles=(Role.FC2,)), set=Settings(weight=RtnConfig(bits=8))),))
    flags = weight_flags(_args("--weights", "optq"))
    assert flags is not None
    with pytest.raises(ConfigError, match="different weight bits/block"):
        flags.apply(mixed, report)
    only = weight_flags(_args("--weights", "rtn", "--weight-only"))
    assert only is not None and only.apply(recipe, report).rules[-1].set.activation == NoneConfig()


def test_the_one_shot_takes_the_weight_flags(toy: tuple[Path, Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from builder.plan.artifact import load_plan

    model, texts, _ = toy
    folder = tmp_path / "run"
    args = [str(model), "--recipe", "int8-gemm", "--weights", "optq", "--weight-bits", "4", "--calib-data",
            str(texts), "--samples", "16", "--batch-size", "8", "--no-build", "--no-evaluate", "--no-progress",
            "-o", str(folder)]
    assert main(args) == 0, capsys.readouterr().err
    plan = load_plan((folder / "plan.json").read_text(encoding="utf-8"))
    assert {w.quantizer for w in plan.weights} == {"optq"} and {w.config.bits for w in plan.weights} == {4}
    assert (folder / "hessians.npz").is_file() and "--weights optq" in (folder / "recipe.yaml").read_text()
    assert main([*args[:-2], "--tile", "64", "--accumulator-bits", "16", "-o", str(tmp_path / "bad")]) == 2
    assert "larger than K=48" in capsys.readouterr().err  # before calibration: the folder holds no statistics
    assert not (tmp_path / "bad" / "statistics.npz").exists()
