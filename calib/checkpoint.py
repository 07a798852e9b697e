"""Calibration stage: observer-state checkpoints (one ``.npz`` file, written atomically).

Layout: ``__meta__`` holds JSON (version, model hash, tensors, options, batches, samples, data digest,
layouts, complete); ``{index}|{key}`` holds state array ``key`` of tensor number ``index``. Loading needs no
pickle. The same file is also the cache of a finished collection: every range method can be recomputed
from it without running the model again.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from calib.artifact_io import atomic_write_bytes
from calib.errors import CalibrationError
from calib.layout import TensorLayout
from calib.tensor_stats import TensorStats

CHECKPOINT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    """What a checkpoint was collected from and how far it got."""

    model_sha256: str
    tensors: tuple[str, ...]
    options: Mapping[str, Any]
    batches: int
    samples: int
    data_sha256: str
    layouts: Mapping[str, TensorLayout]
    complete: bool

    def to_json(self) -> str:
        return json.dumps({
            "version": CHECKPOINT_VERSION, "model_sha256": self.model_sha256, "tensors": list(self.tensors),
            "options": dict(self.options), "batches": self.batches, "samples": self.samples,
            "data_sha256": self.data_sha256, "complete": self.complete,
            "layouts": {k: v.to_dict() for k, v in self.layouts.items()},
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        data = json.loads(text)
        if data.get("version") != CHECKPOINT_VERSION:
            raise CalibrationError(f"checkpoint version {data.get('version')!r} not supported; "
                                   f"expected {CHECKPOINT_VERSION}")
        return cls(model_sha256=data["model_sha256"], tensors=tuple(data["tensors"]), options=data["options"],
                   batches=int(data["batches"]), samples=int(data["samples"]), data_sha256=data["data_sha256"],
                   layouts={k: TensorLayout.from_dict(v) for k, v in data["layouts"].items()},
                   complete=bool(data["complete"]))


def save_checkpoint(path: Path, meta: CheckpointMeta, stats: Mapping[str, TensorStats]) -> None:
    """Write ``meta`` and every tensor's observer state to ``path`` atomically."""
    arrays: dict[str, npt.NDArray[Any]] = {"__meta__": np.asarray(meta.to_json())}
    for index, name in enumerate(meta.tensors):
        for key, value in stats[name].state().items():
            arrays[f"{index}|{key}"] = np.asarray(value)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> tuple[CheckpointMeta, dict[str, TensorStats]]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = CheckpointMeta.from_json(str(data["__meta__"]))
            per_tensor: dict[int, dict[str, npt.NDArray[Any]]] = {}
            for key in data.files:
                if key == "__meta__":
                    continue
                index, sub = key.split("|", 1)
                per_tensor.setdefault(int(index), {})[sub] = data[key]
    except (OSError, ValueError, KeyError) as exc:
        raise CalibrationError(f"cannot read calibration checkpoint {path}: {exc}; delete it to start over") from exc
    stats = {name: TensorStats.from_state(name, per_tensor.get(i, {})) for i, name in enumerate(meta.tensors)}
    return meta, stats
