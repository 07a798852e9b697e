"""Calibration stage: which axes of an activation are token axes, and its valid (non-padding) rows.

The collector runs the first batch twice, at sequence length S and S+1 (one extra padding column), and
compares shapes: an axis whose size goes S -> S+1 is a token axis; an axis 0 of size B*S -> B*(S+1) is
a flattened batch-token axis. A shape coincidence (head_dim == S) cannot fool the probe.

    hidden state [B, S, D]      token_axes=(1,)     rows = x[b, s, :] where mask[b, s]
    scores/probs [B, H, S, S]   token_axes=(2, 3)   values where mask[b, q] and mask[b, k]; no per-dim rows
    flattened    [B*S, D]       flattened=True      rows = x[r, :] where mask.reshape(-1)[r]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True, kw_only=True)
class TensorLayout:
    """Token axes of one tensor (probe result)."""

    token_axes: tuple[int, ...] = ()
    flattened: bool = False  # axis 0 is batch*sequence

    @property
    def has_dims(self) -> bool:
        """True when the last axis is a feature axis (per-dimension statistics make sense)."""
        return not self.token_axes or self.token_axes[-1] != -1

    def to_dict(self) -> dict[str, object]:
        return {"token_axes": list(self.token_axes), "flattened": self.flattened}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> TensorLayout:
        axes = data.get("token_axes", [])
        assert isinstance(axes, list)
        return cls(token_axes=tuple(int(a) for a in axes), flattened=bool(data.get("flattened", False)))


def infer_layout(shape_s: tuple[int, ...], shape_s1: tuple[int, ...], batch: int, seq: int) -> TensorLayout:
    """Compare one tensor's shapes at sequence lengths ``seq`` and ``seq + 1`` (same ``batch``)."""
    if len(shape_s) != len(shape_s1) or not shape_s:
        return TensorLayout()
    if shape_s[0] == batch * seq and shape_s1[0] == batch * (seq + 1):
        return TensorLayout(flattened=True)
    axes = [a for a in range(len(shape_s)) if shape_s[a] == seq and shape_s1[a] == seq + 1]
    if axes and (axes[0] == 0 or shape_s[0] != batch):
        logger.warning("tensor of shape %s has token axes %s but no batch axis 0; padding is not excluded",
                       shape_s, axes)
        return TensorLayout()
    rank = len(shape_s)
    return TensorLayout(token_axes=tuple(-1 if a == rank - 1 else a for a in axes))


def _broadcast_mask(arr: npt.NDArray[np.generic], lead_shape: tuple[int, ...], axis: int) -> npt.NDArray[np.generic]:
    """View a [B, S] array with B on axis 0 and S on ``axis`` of ``lead_shape``."""
    shape = [1] * len(lead_shape)
    shape[0], shape[axis] = arr.shape[0], arr.shape[1]
    return np.broadcast_to(arr.reshape(shape), lead_shape)


def valid_rows(x: F32, layout: TensorLayout, mask: Mask | None,
               ids: I64 | None = None) -> tuple[F32, I64 | None]:
    """The non-padding values of ``x`` as rows [N, D] (D = last axis, or 1 without per-dim rows).

    Returns ``(rows, row_ids)``; ``row_ids`` gives the token id of each row when ``ids`` is given and the
    tensor has exactly one token axis (else None).
    """
    if x.ndim == 0:
        return x.reshape(1, 1), None
    if layout.has_dims:
        rows2d = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(-1, 1)
        lead = x.shape[:-1] if x.ndim > 1 else x.shape
    else:
        rows2d, lead = x.reshape(-1, 1), x.shape
    if mask is None or (not layout.token_axes and not layout.flattened):
        return rows2d, None
    if layout.flattened:
        keep = mask.reshape(-1)
        if keep.size != lead[0]:
            raise CalibrationError(f"flattened token axis of size {lead[0]} does not match the mask {mask.shape}")
        keep_full = np.broadcast_to(keep.reshape((-1,) + (1,) * (len(lead) - 1)), lead)
        row_ids = None if ids is None else np.broadcast_to(
            ids.reshape((-1,) + (1,) * (len(lead) - 1)), lead)[keep_full]
    else:
        if x.shape[0] != mask.shape[0]:
            raise CalibrationError(f"tensor batch axis {x.shape[0]} does not match the attention mask {mask.shape}")
        keep_full = np.ones(lead, dtype=bool)
        axes = [len(x.shape) - 1 if a == -1 else a for a in layout.token_axes]
        for axis in axes:
            keep_full = keep_full & _broadcast_mask(mask, lead, axis).astype(bool)
        row_ids = None
        if ids is not None and len(axes) == 1 and layout.has_dims:
            row_ids = np.asarray(_broadcast_mask(ids, lead, axes[0]))[keep_full]
    flat = keep_full.reshape(-1)
    if flat.all():
        return rows2d, row_ids
    return rows2d[flat], row_ids
