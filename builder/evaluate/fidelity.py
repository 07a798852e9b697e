"""Evaluation stage: streaming fidelity of one output against FP32 (cosine, errors, top-1 and KL for logits).

An output is read as vectors along its last axis. When its two leading axes are the batch's [batch, seq],
padding positions (attention mask 0) are dropped first. Per vector: the cosine to the FP32 vector; over all:
``||y - y_fp32|| / ||y_fp32||`` and ``max |y - y_fp32|``; for logits also the share of vectors whose argmax
equals FP32's and the mean KL(P_fp32 || P_model) of the softmax distributions, in nats:

    KL = sum_v p_v (log p_v - log q_v),   log p = x - logsumexp(x)   (float64, in row chunks)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from builder.evaluate.metrics import ErrorAccumulator
from builder.evaluate.report import OutputFidelity
from calib.errors import ConfigError, GraphError

KL_CHUNK_ROWS = 256  # rows per float64 log-softmax chunk: bounds the temporary memory for large vocabularies


def vectors(values: npt.NDArray[Any], mask: npt.NDArray[Any] | None) -> npt.NDArray[Any]:
    """``values`` as [vectors, last axis], padding positions dropped when the leading axes match ``mask``."""
    arr = np.asarray(values)
    if mask is not None and arr.ndim >= 2 and arr.shape[:2] == mask.shape:
        arr = arr[mask.astype(bool)]
    if arr.ndim == 0:
        return arr.reshape(1, 1)
    if arr.ndim == 1:
        return arr.reshape(1, -1)
    return arr.reshape(-1, arr.shape[-1])


def log_softmax(x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Row-wise log-softmax in float64."""
    x64 = np.asarray(x, dtype=np.float64)
    shifted = x64 - np.max(x64, axis=-1, keepdims=True)
    out: npt.NDArray[np.float64] = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    return out


def kl_rows(reference: npt.NDArray[Any], model: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """KL(softmax(reference) || softmax(model)) per row, in nats (float64, chunked)."""
    out = np.empty(reference.shape[0], dtype=np.float64)
    for start in range(0, reference.shape[0], KL_CHUNK_ROWS):
        stop = start + KL_CHUNK_ROWS
        log_p = log_softmax(reference[start:stop])
        log_q = log_softmax(model[start:stop])
        out[start:stop] = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return np.maximum(out, 0.0)  # rounding can leave -1e-17 for identical rows


@dataclass
class FidelityAccumulator:
    """Streams batches of one output against FP32 (see the module docstring)."""

    name: str
    kind: str
    errors: ErrorAccumulator = field(default_factory=ErrorAccumulator)
    cosine_sum: float = 0.0
    cosine_min: float = 1.0
    count: int = 0
    top1_equal: int = 0
    kl_sum: float = 0.0

    def add(self, model: npt.NDArray[Any], reference: npt.NDArray[Any], mask: npt.NDArray[Any] | None,
            reference_argmax: npt.NDArray[Any] | None = None) -> None:
        """One batch; ``reference_argmax`` (same leading axes) overrides the argmax of a rounded reference."""
        got_all, ref_all = vectors(model, mask), vectors(reference, mask)
        top1 = None if reference_argmax is None else vectors(reference_argmax[..., None], mask)[:, 0]
        if got_all.shape != ref_all.shape:
            raise ConfigError(
                f"output {self.name!r}: shape {got_all.shape} cannot be compared with FP32's {ref_all.shape}"
            )
        for start in range(0, got_all.shape[0], KL_CHUNK_ROWS):  # float64 copies of a chunk at a time
            self._add_rows(got_all[start:start + KL_CHUNK_ROWS].astype(np.float64),
                           ref_all[start:start + KL_CHUNK_ROWS].astype(np.float64),
                           None if top1 is None else top1[start:start + KL_CHUNK_ROWS])

    def _add_rows(self, got: npt.NDArray[np.float64], ref: npt.NDArray[np.float64],
                  ref_top1: npt.NDArray[Any] | None) -> None:
        if not np.all(np.isfinite(got)):
            raise GraphError(f"output {self.name!r} of the evaluated model holds non-finite values")
        self.errors.add(got, ref)
        dot = np.einsum("ij,ij->i", got, ref)
        got_norm, ref_norm = np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1)
        norms = got_norm * ref_norm
        both_zero = (got_norm == 0) & (ref_norm == 0)
        cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
        self.cosine_sum += float(np.sum(cosine))
        if cosine.size:
            self.cosine_min = min(self.cosine_min, float(np.min(cosine)))
        self.count += int(cosine.size)
        if self.kind == "logits":
            expected = np.argmax(ref, axis=1) if ref_top1 is None else ref_top1
            self.top1_equal += int(np.sum(np.argmax(got, axis=1) == expected))
            self.kl_sum += float(np.sum(kl_rows(ref, got)))

    def result(self) -> OutputFidelity:
        if self.count == 0:
            raise ConfigError(f"output {self.name!r}: nothing was compared")
        logits = self.kind == "logits"
        return OutputFidelity(
            name=self.name,
            kind=self.kind,
            vectors=self.count,
            cosine_mean=self.cosine_sum / self.count,
            cosine_min=self.cosine_min,
            relative_error=self.errors.relative_error,
            max_abs_error=self.errors.max_abs,
            top1_agreement=self.top1_equal / self.count if logits else None,
            kl_mean=self.kl_sum / self.count if logits else None,
        )
