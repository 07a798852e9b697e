"""The build matrix: 3 recipes x 2 architectures -> 6 real TensorRT-RTX engines through Ray tasks (a private
Ray in a loopback-only network namespace), one table and a Pareto plot; and the routing of full-TensorRT
builds by Ray resources."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.backends.options import BackendName, BuildOptions, DimRange, ShapeProfile
from builder.distributed.sweep import SweepTask
from builder.distributed.sweep_report import SweepReport
from builder.engine.manifest import read_manifest
from builder.evaluate.pareto import pareto_front
from calib.artifact_io import sha256_file
from tests.loopback import LoopbackNamespace

RECIPES = ("int8-gemm", "hero-m2", "hero-m3")
ARCHS = ("sm86", "sm89")


def _rtx_available() -> bool:
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        return False
    return True


def test_tasks_are_routed_by_backend() -> None:
    profile = ShapeProfile(batch=DimRange(min=1, opt=4, max=8), seq=DimRange(min=1, opt=64, max=64))
    rtx = SweepTask(recipe="int8-gemm", backend=BackendName.TENSORRT_RTX, architecture="sm89", profile=profile)
    full = SweepTask(recipe="int8-gemm", backend=BackendName.TENSORRT, architecture="sm89", profile=profile)
    assert rtx.resources.ray_options(3) == {"num_cpus": 1, "max_retries": 3}  # any CPU
    assert full.resources.ray_options(3) == {"num_cpus": 1, "max_retries": 3, "num_gpus": 1,
                                             "resources": {"tensorrt-sm89": 1}}  # that GPU model only
    options = rtx.options(BuildOptions(optimization_level=0))
    assert options.architectures == ("sm89",) and options.profiles == (profile,) and options.optimization_level == 0
    assert rtx.name == "tensorrt-rtx-sm89-b1-4-8-s1-64-64"


def test_pareto_front_keeps_the_undominated_points() -> None:
    # (size, accuracy): b is smaller and better than a; c is larger but the most accurate; d is dominated by b
    assert pareto_front([(60.0, 0.990), (55.0, 0.995), (70.0, 0.999), (58.0, 0.994)]) == [1, 2]


def _sweep(minilm_onnx: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "tests.ray_driver", "2", "--", "sweep", str(minilm_onnx), "--recipes", ",".join(RECIPES),
            "--arch", ",".join(ARCHS), "--batch", "1,4,8", "--seq", "1,64,64", "--opt-level", "0", "--samples", "32",
            "--ray", "auto", "--shards", "2", "--no-progress", "-o", str(out), *extra]


@pytest.mark.slow
@pytest.mark.skipif(not _rtx_available(), reason="TensorRT-RTX (the [rtx] extra) is not installed")
def test_sweep_builds_six_rtx_engines_through_ray_with_one_table(minilm_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "sweep"
    with LoopbackNamespace() as namespace:
        first = namespace.run_python(_sweep(minilm_onnx, out, "--eval-test", "48", "--eval-train", "96"),
                                     timeout_s=1200)
        assert first.returncode == 0, first.stderr[-3000:]
        report = SweepReport.from_json((out / "sweep.json").read_bytes())
        # a re-run reuses all six engines (same statistics, quantized bytes and backend)
        again = namespace.run_python(_sweep(minilm_onnx, out, "--no-evaluate"), timeout_s=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "calibration" / "shards").is_dir()  # calibrated once, sharded on Ray
    assert len(report.rows) == 6 and {(r.recipe, r.architecture) for r in report.rows} == {
        (r, a) for r in RECIPES for a in ARCHS}
    for row in report.rows:
        manifest = read_manifest(out / row.engine_dir)
        assert manifest.backend == "tensorrt-rtx" and manifest.architectures == (row.architecture,)
        assert sha256_file(out / row.engine_dir / manifest.plan_file) == manifest.plan_sha256
        assert manifest.model_sha256 == sha256_file(out / row.recipe / "model.onnx")  # the shared quantize
        assert row.plan_bytes == manifest.plan_bytes and not row.reused
        assert row.cosine_mean is not None and 0.5 < row.cosine_mean <= 1.0
    assert (out / "pareto.png").stat().st_size > 0
    table = (out / "sweep.md").read_text(encoding="utf-8")
    assert all(r in table for r in RECIPES) and table.count("| tensorrt-rtx") == 6
    rerun = SweepReport.from_json((out / "sweep.json").read_bytes())
    assert len(rerun.rows) == 6 and all(r.reused for r in rerun.rows)


def test_full_tensorrt_builds_need_a_node_with_that_gpu(minilm_onnx: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    with LoopbackNamespace() as namespace:
        run = namespace.run_python(["-m", "tests.ray_driver", "1", "--", "sweep", str(minilm_onnx), "--recipes",
                                    "int8-gemm", "--backends", "tensorrt", "--arch", "sm89", "--samples", "16",
                                    "--no-evaluate", "--ray", "auto", "--no-progress", "-o", str(tmp_path / "sweep")])
    assert run.returncode == 2, run.stderr[-2000:]
    assert "tensorrt-sm89" in run.stderr
    assert not (tmp_path / "sweep" / "calibration").exists()  # refused before calibrating or building
