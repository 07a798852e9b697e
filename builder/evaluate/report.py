"""Evaluation stage: the AccuracyReport artifact (fidelity to FP32, task accuracy, per-layer error).

One report describes one evaluated model against its FP32 reference on the same data: cosine of the pooled
sentence embeddings, a logistic-regression probe on the VADER movie sentences (scored with the probe fitted on
FP32 embeddings, and refitted on the model's own embeddings), Spearman correlation on the Lee rated document
pairs, the share of GEMM FLOPs that run in INT8, and a per-layer table of the residual-stream error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from calib.artifact_io import versioned_object
from calib.errors import ConfigError

ACCURACY_REPORT_VERSION = 1

# sub-block points of a transformer layer whose output error is reported
LAYER_POINTS = ("attn", "block")


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, kw_only=True)
class LayerError:
    """Error of one residual-stream tensor of the evaluated model against the same tensor in FP32.

    ``relative_error`` is ``||y - y_fp32||_F / ||y_fp32||_F`` over the non-padding tokens of the layer
    sentences; ``None`` when the evaluated model no longer has a tensor of that name (for example after a
    rewrite that renamed it).
    """

    layer: int
    point: str  # "attn": after the attention sub-block; "block": after the whole block (FFN included)
    tensor: str
    relative_error: float | None
    max_abs_error: float | None

    def __post_init__(self) -> None:
        if self.point not in LAYER_POINTS:
            raise ConfigError(f"layer point {self.point!r} unknown; expected one of {LAYER_POINTS}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "point": self.point,
            "tensor": self.tensor,
            "relative_error": self.relative_error,
            "max_abs_error": self.max_abs_error,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerError:
        return cls(
            layer=int(data["layer"]),
            point=str(data["point"]),
            tensor=str(data["tensor"]),
            relative_error=_opt_float(data["relative_error"]),
            max_abs_error=_opt_float(data["max_abs_error"]),
        )


@dataclass(frozen=True, kw_only=True)
class AccuracyReport:
    """Accuracy of one model against its FP32 reference (all fractions in [0, 1])."""

    model_name: str
    num_train: int  # probe training sentences
    num_test: int  # probe test sentences (cosine is measured on these too)
    num_pairs: int  # rated Lee document pairs
    probe_accuracy: float  # FP32-fitted probe scored on this model's test embeddings
    probe_accuracy_refit: float | None  # probe refitted on this model's own train embeddings (None: skipped)
    reference_probe_accuracy: float  # FP32 probe on FP32 test embeddings
    cosine_mean: float
    cosine_min: float
    spearman: float
    reference_spearman: float
    int8_gemm_share: float | None  # share of MatMul/Gemm FLOPs with both inputs dequantized from INT8
    layer_errors: tuple[LayerError, ...] = ()
    warnings: tuple[str, ...] = ()
    version: int = field(default=ACCURACY_REPORT_VERSION)

    def __post_init__(self) -> None:
        for name in ("probe_accuracy", "probe_accuracy_refit", "reference_probe_accuracy", "cosine_mean"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"AccuracyReport.{name}={value!r} is not a finite number")

    @property
    def probe_delta(self) -> float:
        """Probe accuracy minus the FP32 reference's (negative: the model lost accuracy)."""
        return self.probe_accuracy - self.reference_probe_accuracy

    def worst_layers(self, count: int = 3, point: str = "block") -> tuple[LayerError, ...]:
        """The ``count`` layers with the largest relative error at ``point``."""
        rows = [e for e in self.layer_errors if e.point == point and e.relative_error is not None]
        rows.sort(key=lambda e: (-(e.relative_error or 0.0), e.layer))
        return tuple(rows[:count])

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model_name": self.model_name,
            "num_train": self.num_train,
            "num_test": self.num_test,
            "num_pairs": self.num_pairs,
            "probe_accuracy": self.probe_accuracy,
            "probe_accuracy_refit": self.probe_accuracy_refit,
            "reference_probe_accuracy": self.reference_probe_accuracy,
            "cosine_mean": self.cosine_mean,
            "cosine_min": self.cosine_min,
            "spearman": self.spearman,
            "reference_spearman": self.reference_spearman,
            "int8_gemm_share": self.int8_gemm_share,
            "layer_errors": [e.to_dict() for e in self.layer_errors],
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccuracyReport:
        data = versioned_object(data, "AccuracyReport", ACCURACY_REPORT_VERSION)
        return cls(
            model_name=str(data["model_name"]),
            num_train=int(data["num_train"]),
            num_test=int(data["num_test"]),
            num_pairs=int(data["num_pairs"]),
            probe_accuracy=float(data["probe_accuracy"]),
            probe_accuracy_refit=_opt_float(data["probe_accuracy_refit"]),
            reference_probe_accuracy=float(data["reference_probe_accuracy"]),
            cosine_mean=float(data["cosine_mean"]),
            cosine_min=float(data["cosine_min"]),
            spearman=float(data["spearman"]),
            reference_spearman=float(data["reference_spearman"]),
            int8_gemm_share=_opt_float(data["int8_gemm_share"]),
            layer_errors=tuple(LayerError.from_dict(e) for e in data["layer_errors"]),
            warnings=tuple(str(w) for w in data["warnings"]),
        )

    @classmethod
    def from_json(cls, text: str) -> AccuracyReport:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"AccuracyReport is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("AccuracyReport JSON must be an object")
        return cls.from_dict(data)
