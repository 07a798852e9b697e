"""Evaluation stage: the metrics (embedding cosine, the logistic-regression probe, Spearman, relative error).

Pure functions over NumPy arrays; no model execution here. scikit-learn is imported inside the probe
functions so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from calib.errors import ConfigError

FloatArray = npt.NDArray[np.float64]

PROBE_SEED = 0
PROBE_C = 1.0  # inverse L2 strength; embeddings are unit-norm, so the default regularisation is kept fixed
PROBE_MAX_ITER = 2000


def _as_2d(name: str, x: npt.ArrayLike) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ConfigError(f"{name} must be a 2-D [rows, features] array, got shape {arr.shape}")
    return arr


def row_cosine(x: npt.ArrayLike, reference: npt.ArrayLike) -> FloatArray:
    """Cosine similarity of each row of ``x`` with the same row of ``reference`` (zero rows give 0)."""
    a = _as_2d("x", x)
    b = _as_2d("reference", reference)
    if a.shape != b.shape:
        raise ConfigError(f"embeddings of shape {a.shape} cannot be compared with reference shape {b.shape}")
    dot: FloatArray = np.einsum("ij,ij->i", a, b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    out = np.zeros_like(dot)
    nonzero = norms > 0
    out[nonzero] = dot[nonzero] / norms[nonzero]
    return out


@dataclass(frozen=True)
class Probe:
    """A fitted binary logistic-regression probe: ``label = w·x + b > 0``."""

    weights: FloatArray  # [features]
    bias: float

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Predicted labels (True: positive class) for the rows of ``x``."""
        arr = _as_2d("x", x)
        if arr.shape[1] != self.weights.shape[0]:
            raise ConfigError(f"probe expects {self.weights.shape[0]} features, got {arr.shape[1]}")
        return np.asarray(arr @ self.weights + self.bias > 0.0)

    def accuracy(self, x: npt.ArrayLike, labels: npt.ArrayLike) -> float:
        """Fraction of rows whose predicted label equals ``labels``."""
        y = np.asarray(labels, dtype=bool)
        pred = self.predict(x)
        if pred.shape != y.shape:
            raise ConfigError(f"{pred.shape[0]} rows but {y.shape} labels")
        return float(np.mean(pred == y))


def fit_probe(x: npt.ArrayLike, labels: npt.ArrayLike, seed: int = PROBE_SEED) -> Probe:
    """Fit the logistic-regression probe (lbfgs, L2, fixed C and seed) on embeddings and binary labels."""
    from sklearn.linear_model import LogisticRegression

    arr = _as_2d("x", x)
    y = np.asarray(labels, dtype=bool)
    if y.shape != (arr.shape[0],):
        raise ConfigError(f"{arr.shape[0]} training rows but labels of shape {y.shape}")
    if np.all(y) or not np.any(y):
        raise ConfigError("the probe needs both positive and negative training labels")
    clf: Any = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, random_state=seed)
    clf.fit(arr, y)
    return Probe(weights=np.asarray(clf.coef_[0], dtype=np.float64), bias=float(clf.intercept_[0]))


def average_ranks(values: npt.ArrayLike) -> FloatArray:
    """Ranks from 1, ties sharing the mean of the ranks they span."""
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.concatenate(([True], sorted_v[1:] != sorted_v[:-1])))
    ends = np.concatenate((starts[1:], [v.size]))
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks (NaN if either is constant)."""
    ra = average_ranks(a)
    rb = average_ranks(b)
    if ra.shape != rb.shape:
        raise ConfigError(f"Spearman needs equal lengths, got {ra.size} and {rb.size}")
    if ra.size < 2:
        raise ConfigError("Spearman needs at least two pairs")
    da = ra - ra.mean()
    db = rb - rb.mean()
    denom = float(np.sqrt(np.dot(da, da) * np.dot(db, db)))
    if denom == 0.0:
        return float("nan")
    return float(np.dot(da, db) / denom)


def pair_similarities(embeddings: npt.ArrayLike, pairs: Sequence[tuple[int, int, float]]) -> FloatArray:
    """Cosine similarity of the embeddings of each ``(i, j, rating)`` pair, in pair order."""
    emb = _as_2d("embeddings", embeddings)
    if not pairs:
        raise ConfigError("no rated pairs given")
    idx = np.asarray([(i, j) for i, j, _ in pairs], dtype=np.int64)
    if idx.min() < 0 or idx.max() >= emb.shape[0]:
        raise ConfigError(f"a pair indexes document {int(idx.max())} but only {emb.shape[0]} documents exist")
    return row_cosine(emb[idx[:, 0]], emb[idx[:, 1]])


def similarity_spearman(embeddings: npt.ArrayLike, pairs: Sequence[tuple[int, int, float]]) -> float:
    """Spearman correlation between embedding cosine and human rating over the rated pairs."""
    predicted = pair_similarities(embeddings, pairs)
    return spearman(predicted, [r for _, _, r in pairs])


@dataclass
class ErrorAccumulator:
    """Streaming ``||y - ref|| / ||ref||`` and ``max |y - ref|`` over batches (float64 sums)."""

    sq_diff: float = 0.0
    sq_ref: float = 0.0
    max_abs: float = 0.0
    count: int = 0

    def add(self, y: npt.ArrayLike, reference: npt.ArrayLike) -> None:
        a = np.asarray(y, dtype=np.float64)
        b = np.asarray(reference, dtype=np.float64)
        if a.shape != b.shape:
            raise ConfigError(f"tensor of shape {a.shape} cannot be compared with reference shape {b.shape}")
        diff = a - b
        self.sq_diff += float(np.sum(diff * diff))
        self.sq_ref += float(np.sum(b * b))
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        self.count += int(diff.size)

    @property
    def relative_error(self) -> float:
        if self.sq_ref == 0.0:
            return 0.0 if self.sq_diff == 0.0 else float("inf")
        return float(np.sqrt(self.sq_diff / self.sq_ref))
