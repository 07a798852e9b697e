"""Profiling stage: a batch x sequence sweep over several models and runtimes -> LatencyReport.

A target is an ONNX file (profiled on ONNX Runtime) or an engine folder (its plan on TensorRT, and its
``model.onnx`` on ONNX Runtime). What cannot run here -- TensorRT without a GPU, the CUDA provider without
onnxruntime-gpu, a shape outside the engine's profile -- is skipped with its reason in the report.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from builder.engine.manifest import EngineManifest, read_manifest
from builder.profile.feeds import make_feeds, onnx_inputs
from builder.profile.ort import TimingConfig, profile_onnxruntime
from builder.profile.report import LatencyReport, LatencyResult
from calib.errors import BackendUnavailable, ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ProfileTarget:
    """A labelled model: an ``.onnx`` file or an engine folder (with manifest.json)."""

    label: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> ProfileTarget:
        """``LABEL=PATH`` or ``PATH`` (label = file stem or folder name)."""
        label, sep, path = text.partition("=")
        target = Path(path if sep else text)
        if not target.exists():
            raise ConfigError(f"profile target {str(target)!r} does not exist")
        if target.is_file() and target.suffix != ".onnx":
            raise ConfigError(f"profile target {str(target)!r} is neither an .onnx file nor an engine folder")
        name = label if sep else (target.name if target.is_dir() else target.stem)
        return cls(label=name, path=target)


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """Shapes, runtimes and timing of one profiling run."""

    batches: tuple[int, ...] = (1, 8)
    seqs: tuple[int, ...] = (32, 128)
    devices: tuple[str, ...] = ("cpu",)  # ONNX Runtime devices: cpu, cuda
    tensorrt: bool = True  # profile engine plans on TensorRT where a GPU is present
    timing: TimingConfig = field(default_factory=TimingConfig)

    def __post_init__(self) -> None:
        if not self.batches or not self.seqs or min(self.batches) < 1 or min(self.seqs) < 1:
            raise ConfigError("batch and sequence lists must be non-empty positive integers")


def _in_profile(manifest: EngineManifest, batch: int, seq: int) -> bool:
    if not manifest.profiles:
        return all(s.shape[:1] == (batch,) for s in manifest.inputs)
    for shapes in manifest.profiles[0].values():
        lo, hi = shapes["min"], shapes["max"]
        if not (lo[0] <= batch <= hi[0]) or (len(lo) > 1 and not lo[1] <= seq <= hi[1]):
            return False
    return True


def _profile_engine(target: ProfileTarget, config: SweepConfig, tokenizer: Path | None,
                    results: list[LatencyResult], skipped: list[str]) -> None:
    from builder.profile.trt import profile_tensorrt

    manifest = read_manifest(target.path)
    inputs = onnx_inputs(target.path / manifest.model_file)
    for batch in config.batches:
        for seq in config.seqs:
            if not _in_profile(manifest, batch, seq):
                skipped.append(f"{target.label} tensorrt b={batch} s={seq}: outside the engine's profile")
                continue
            feeds = make_feeds(inputs, batch, seq, tokenizer)
            try:
                results.append(profile_tensorrt(target.path, manifest, feeds, label=target.label,
                                                timing=config.timing))
            except BackendUnavailable as exc:
                skipped.append(f"{target.label} tensorrt: {exc}")
                return


def run_sweep(targets: Sequence[ProfileTarget], config: SweepConfig, tokenizer: Path | None) -> LatencyReport:
    """Profile every target at every batch x sequence on every available runtime."""
    results: list[LatencyResult] = []
    skipped: list[str] = []
    for target in targets:
        onnx_path = target.path
        if target.path.is_dir():
            if config.tensorrt:
                _profile_engine(target, config, tokenizer, results, skipped)
            onnx_path = target.path / read_manifest(target.path).model_file
        inputs = onnx_inputs(onnx_path)
        for device in config.devices:
            try:
                for batch in config.batches:
                    for seq in config.seqs:
                        feeds = make_feeds(inputs, batch, seq, tokenizer)
                        results.append(profile_onnxruntime(onnx_path, feeds, label=target.label, device=device,
                                                           timing=config.timing))
            except BackendUnavailable as exc:
                skipped.append(f"{target.label} onnxruntime-{device}: {exc}")
    for line in skipped:
        logger.warning("skipped: %s", line)
    host = {"machine": platform.machine(), "processor": platform.processor() or "unknown",
            "python": platform.python_version(), "system": platform.system()}
    return LatencyReport(results=tuple(results), skipped=tuple(skipped), host=host)
