"""Weight stage: the GEMM input a weight *view* multiplies, for the data-aware quantizers (OPTQ, GPFQ).

An activation quantizer may hand the weight stage a transformed view of a GEMM's weight instead of the weight
itself (builder.quant.base.ActivationQuantizer.weight_views): HERO FWQ and SmoothQuant scale its rows,
W' = diag(s) W, and feed the GEMM X / s; PEG splits it into row groups W_g = W[dims_g] read by X[:, dims_g].
The statistics of the GEMM input X were collected on the float model, so OPTQ's H and GPFQ's float rows must
be mapped to the inputs of the view:

    X_view = X M          M = diag(1/s) (scaled rows)   or   the columns dims_g of the identity (row group)
    H_view = M^T H M      (H = 2/n X^T X)

The map is read off the view of the identity: views are row transforms, so the view of I_K (in the stored
layout) is the transform T with W_view = T W, and M is its inverse (diag(1/s)) or its transpose (a
selection). A view that is neither is refused: these quantizers cannot tell which inputs it multiplies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from builder.plan.artifact import ActivationEdge
from builder.quant.registry import activation_quantizer
from calib.errors import ConfigError
from calib.statistics import TensorStatistics

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class InputMap:
    """X_view = X M: ``identity``, ``scale`` (X_view[:, j] = X[:, j] * factor[j]) or ``select`` (X[:, index])."""

    kind: Literal["identity", "scale", "select"]
    factor: F64 | None = None  # scale: 1/s per input
    index: I64 | None = None  # select: the inputs of X the view reads, in view order

    def rows(self, x: F32) -> F32:
        """X_view of rows ``x`` [n, K] (float32)."""
        if self.kind == "scale":
            assert self.factor is not None
            out: F32 = (x * self.factor.astype(np.float32)).astype(np.float32)
            return out
        if self.kind == "select":
            assert self.index is not None
            return np.ascontiguousarray(x[:, self.index])
        return x

    def hessian(self, h: F64) -> F64:
        """M^T H M."""
        if self.kind == "scale":
            assert self.factor is not None
            scaled: F64 = h * np.outer(self.factor, self.factor)
            return scaled
        if self.kind == "select":
            assert self.index is not None
            picked: F64 = h[np.ix_(self.index, self.index)]
            return picked
        return h


IDENTITY = InputMap("identity")


def _classify(transform: F32, node: str, view: str) -> InputMap:
    """The InputMap of a row transform T [K_view, K] (W_view = T W)."""
    t = np.asarray(transform, dtype=np.float64)
    k_view, k = t.shape
    diagonal = np.diag(t) if k_view == k else None
    if diagonal is not None and np.count_nonzero(t - np.diag(diagonal)) == 0 and np.all(diagonal != 0):
        if np.all(diagonal == 1.0):
            return IDENTITY
        return InputMap("scale", factor=1.0 / diagonal)
    nonzero = np.count_nonzero(t, axis=1)
    if np.all(nonzero == 1) and np.all(t[t != 0] == 1.0):
        return InputMap("select", index=np.argmax(t != 0, axis=1).astype(np.int64))
    raise ConfigError(f"GEMM {node!r}: its input quantizer's weight view {view!r} is neither a row scaling nor a row "
                      "selection of the weight, so OPTQ/GPFQ cannot tell which inputs it multiplies; use rtn there")


def input_maps(edge: ActivationEdge | None, weight_shape: tuple[int, ...], axis: int, node: str) -> dict[str, InputMap]:
    """The InputMap of every weight view of GEMM ``node`` whose input edge is ``edge`` (None: the weight itself)."""
    if edge is None:
        return {"": IDENTITY}
    k = int(weight_shape[1 - axis % 2])
    probe = np.eye(k, dtype=np.float32)  # the identity in the stored layout ([K, K] either way)
    views = activation_quantizer(edge.quantizer).weight_views(edge.params, probe, axis)
    return {view: _classify(value if axis % 2 == 1 else value.T, node, view) for view, value in views.items()}


class MappedHessian:
    """The tensor's Hessian mapped to a weight view: what the OPTQ quantizer reads as ``hessian``."""

    kind = "hessian"

    def __init__(self, source: Any, mapping: InputMap) -> None:
        self._source = source
        self._mapping = mapping

    def matrix(self, first_weight: float = 1.0) -> F64:
        """The mapped H, its first-token rows weighed ``first_weight`` times (the map is linear in H)."""
        out: F64 = self._mapping.hessian(self._source.matrix(first_weight))
        return out


def view_statistics(stats: TensorStatistics | None, mapping: InputMap, view: str) -> TensorStatistics | None:
    """The input statistics of a weight view: the tensor's own for the identity map, else its Hessian mapped."""
    if stats is None or mapping.kind == "identity" or "hessian" not in stats.observers:
        return stats
    observers: dict[str, Any] = {"hessian": MappedHessian(stats.observers["hessian"], mapping)}
    return TensorStatistics(tensor=f"{stats.tensor}#{view}", observers=observers)
