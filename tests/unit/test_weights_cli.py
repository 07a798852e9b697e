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

    # bits and block are the recipe's; its scale is RTN's choice, so OPTQ keeps its own (auto)
    assert weight_of("--weights", "optq") == OptqConfig(bits=4, block=32)
    assert weight_of("--weights", "optq", "--weight-bits", "3", "--act-order") == OptqConfig(bits=3, block=32)
    assert weight_of("--weights", "rtn") == RtnConfig(bits=4, block=32)
    same = Recipe(name="w4-optq-max", rules=(Rule(select=Selector(roles=roles), set=Settings(
        precision=Precision.INT8, activation=NoneConfig(), weight=OptqConfig(bits=4, block=32, scale="max"))),))
    flags_same = weight_flags(_args("--weights", "optq"))
    assert flags_same is not None  # the same quantizer: its scale is inherited
    assert flags_same.apply(same, report).rules[-1].set.weight == OptqConfig(bits=4, block=32, scale="max")
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


def test_weight_flags_on_a_float_recipe_need_weight_only() -> None:
    """``--recipe fp16 --weights optq`` used to change nothing (no GEMM of that recipe is quantized) and exit 0.
    Now: an error naming the way out; ``--weight-only`` on a float32 recipe without INT8 GEMMs is W4A16 / W8A16,
    the LM head kept as the recipe has it (float); on the FP16-converted recipe, an error before any work."""
    from builder.recipes.resolve import resolve
    from tests.toy_llama import llama_block_model

    report = analyze(llama_block_model(layers=1), name="toy_llama")
    plain = Recipe(name="float", rules=(), defaults=Settings(precision=Precision.FP32))
    flags = weight_flags(_args("--weights", "optq", "--weight-bits", "4"))
    assert flags is not None
    with pytest.raises(ConfigError, match=r"quantizes no weight GEMM of this model.*add --weight-only"):
        flags.apply(plain, report)
    only = weight_flags(_args("--weights", "optq", "--weight-bits", "4", "--weight-only"))
    assert only is not None
    nodes = resolve(only.apply(plain, report), report).values()
    by_role = {n.assignment.role: n.settings for n in nodes}
    for role in (Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_OUT, Role.GATE_PROJ, Role.UP_PROJ, Role.FC2):
        settings = by_role[role]
        assert settings.precision == Precision.INT8 and settings.activation == NoneConfig(), role
        assert settings.weight == OptqConfig(bits=4), role
    assert by_role[Role.LM_HEAD].precision == Precision.FP32
    fp16 = Recipe(name="fp16", rules=(), defaults=Settings(precision=Precision.FP16), model_dtype=Precision.FP16)
    for given in (only, flags):
        with pytest.raises(ConfigError, match=r"converts the whole model to fp16.*--recipe int8-gemm --weights optq"):
            given.apply(fp16, report)


def test_weight_only_flags_on_a_float_recipe_lower_and_run(toy: tuple[Path, Path, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The whole one-shot with a float32 recipe and --weight-only: INT8 weights, float inputs, runs on ORT."""
    import numpy as np
    import onnxruntime as ort

    from builder.plan.artifact import load_plan

    model, texts, _ = toy
    recipe = tmp_path / "float.yaml"
    recipe.write_text("version: 2\nname: float32\ndefaults: {precision: fp32}\nrules: []\n", encoding="utf-8")
    folder = tmp_path / "run"
    assert main([str(model), "--recipe", str(recipe), "--weights", "rtn", "--weight-only", "--calib-data",
                 str(texts), "--samples", "16", "--batch-size", "8", "--no-build", "--no-evaluate", "--no-progress",
                 "-o", str(folder)]) == 0, capsys.readouterr().err
    plan = load_plan((folder / "plan.json").read_text(encoding="utf-8"))
    assert len(plan.weights) == 6  # Q, K, V, attention out, FC1, FC2
    assert plan.activations and {a.quantizer for a in plan.activations} == {"none"}  # their inputs stay float
    assert len(plan.weight_only_nodes) == 6 and plan.int8_gemm_flop_share == 0.0  # no GEMM computes in INT8
    summary = capsys.readouterr().out
    assert "0 quantized activations, 6 8-bit integer weights (6 GEMMs weight-only)" in summary, summary
    assert "INT8 GEMM-FLOP share 0.0%" in summary
    lowered = onnx.load(str(folder / "model.onnx"))
    assert sum(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 for i in lowered.graph.initializer) == 6
    feed = {"input_ids": np.array([[101, 2023, 2003, 1037, 3231, 102]], dtype=np.int64),
            "attention_mask": np.ones((1, 6), dtype=np.int64)}
    names = [i.name for i in onnx.load(str(model)).graph.input]
    feed = {k: v for k, v in feed.items() if k in names}
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    out = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    cosine = float(np.sum(ref * out) / (np.linalg.norm(ref) * np.linalg.norm(out)))
    assert cosine > 0.999  # 8-bit per-channel weights, float activations
