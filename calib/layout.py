"""Calibration stage: which axes of an activation are token axes, and its valid (non-padding) rows.

The collector runs the first rows of the first batch twice, at sequence lengths S and S-1 (S+1 when S is 1),
and compares shapes: an axis whose size follows the length is a token axis; an axis 0 of size B*S is a
flattened batch-token axis. A shape coincidence (head_dim == S) cannot fool the probe. An axis 0 that is a
multiple of the batch before token axes (an export that merged batch and heads) is checked at a second batch
size, and such a tensor is viewed [B, H, ...] before anything else reads it.

    hidden state [B, S, D]      token_axes=(1,)     rows = x[b, s, :] where mask[b, s]
    scores/probs [B, H, S, S]   token_axes=(2, 3)   values where mask[b, q] and mask[b, k]; no per-dim rows
    flattened    [B*S, D]       flattened=True      rows = x[r, :] where mask.reshape(-1)[r]
    merged       [B*H, S, S]    token_axes=(1, -1)  viewed [B, H, S, S] (batch-major), then as scores
                                batch_group=H
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError
from calib.schema import Schema

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]


class TensorLayout(Schema, frozen=True, kw_only=True):
    """Token axes of one tensor (probe result)."""

    token_axes: tuple[int, ...] = ()
    flattened: bool = False  # axis 0 is batch*sequence
    batch_group: int = 1  # axis 0 is batch*batch_group, batch-major (an export that merged batch and heads)

    @property
    def has_dims(self) -> bool:
        """True when the last axis is a feature axis (per-dimension statistics make sense)."""
        return not self.token_axes or self.token_axes[-1] != -1

    def split_batch(self, x: npt.NDArray[np.generic]) -> tuple[npt.NDArray[np.generic], TensorLayout]:
        """``x`` [B*g, ...] viewed [B, g, ...] and the layout of that view (token axes one further right)."""
        group = self.batch_group
        if group <= 1:
            return x, self
        if x.ndim < 1 or x.shape[0] % group:
            raise CalibrationError(f"tensor axis 0 of size {x.shape[0] if x.ndim else 0} is not a multiple of "
                                   f"its merged batch group {group}")
        axes = tuple(a if a == -1 else a + 1 for a in self.token_axes)
        return x.reshape((x.shape[0] // group, group, *x.shape[1:])), TensorLayout(token_axes=axes)


def _token_axes(shape_s: tuple[int, ...], shape_s1: tuple[int, ...], seq: int) -> list[int]:
    return [a for a in range(len(shape_s)) if shape_s[a] == seq and shape_s1[a] == seq + 1]


def merged_batch_candidate(shape_s: tuple[int, ...], shape_s1: tuple[int, ...], batch: int, seq: int) -> bool:
    """Whether the tensor has token axes after an axis 0 that is a multiple of the batch: batch and another axis
    (attention heads) merged, which a probe at a second batch size tells (:func:`infer_layout` ``other``)."""
    if len(shape_s) != len(shape_s1) or not shape_s or shape_s[0] == batch * seq:
        return False
    axes = _token_axes(shape_s, shape_s1, seq)
    return bool(axes) and axes[0] != 0 and shape_s[0] != batch and shape_s[0] % batch == 0


def infer_layout(shape_s: tuple[int, ...], shape_s1: tuple[int, ...], batch: int, seq: int,
                 other: tuple[tuple[int, ...], int] | None = None) -> TensorLayout:
    """Compare one tensor's shapes at sequence lengths ``seq`` and ``seq + 1`` (same ``batch``); ``other``, the
    shape at sequence ``seq`` and another batch size, tells a merged batch axis ([B*H, S, S])."""
    if len(shape_s) != len(shape_s1) or not shape_s:
        return TensorLayout()
    if shape_s[0] == batch * seq and shape_s1[0] == batch * (seq + 1):
        return TensorLayout(flattened=True)
    axes = _token_axes(shape_s, shape_s1, seq)
    rank = len(shape_s)
    relative = tuple(-1 if a == rank - 1 else a for a in axes)
    if other is not None and merged_batch_candidate(shape_s, shape_s1, batch, seq):
        group = shape_s[0] // batch
        other_shape, other_batch = other
        if len(other_shape) == rank and other_shape[0] == other_batch * group and other_shape[1:] == shape_s[1:]:
            return TensorLayout(token_axes=relative, batch_group=group)
    if axes and (axes[0] == 0 or shape_s[0] != batch):
        logger.warning("tensor of shape %s has token axes %s but no batch axis 0; padding is not excluded",
                       shape_s, axes)
        return TensorLayout()
    return TensorLayout(token_axes=relative)


def _broadcast_mask(arr: npt.NDArray[np.generic], lead_shape: tuple[int, ...], axis: int) -> npt.NDArray[np.generic]:
    """View a [B, S] array with B on axis 0 and S on ``axis`` of ``lead_shape``."""
    shape = [1] * len(lead_shape)
    shape[0], shape[axis] = arr.shape[0], arr.shape[1]
    return np.broadcast_to(arr.reshape(shape), lead_shape)


def prefix_lengths(mask: Mask) -> I64 | None:
    """Valid positions per row when every row of ``mask`` [B, S] is ones then zeros (right padding), else None."""
    lengths: I64 = mask.sum(axis=1, dtype=np.int64)
    if not np.array_equal(mask, np.arange(mask.shape[1]) < lengths[:, None]):
        return None
    return lengths


def _prefix_slices(x: F32, axes: list[int], lengths: I64, width: int) -> F32:
    """The valid values of ``x`` as rows [N, width], sample by sample (right padding: a slice per token axis).

    For sample b the token axes are cut to their first ``lengths[b]`` positions; concatenating the samples
    keeps the order of a boolean selection (b, then the remaining axes in order) at memcpy speed.
    """
    pieces = []
    for b, length in enumerate(lengths.tolist()):
        index = tuple(slice(0, length) if axis in axes else slice(None) for axis in range(1, x.ndim))
        pieces.append(x[b][index].reshape(-1, width))
    return np.concatenate(pieces) if pieces else x.reshape(-1, width)[:0]


def first_token_rows(x: F32, layout: TensorLayout, mask: Mask | None) -> tuple[F32, I64] | None:
    """``(rows [M, D], samples [M])``: the row of each sample's first valid token (position 0 of its text) and
    the sample's index in the batch (samples without a valid token are left out); None when ``x`` has no single
    token axis 1 (or a flattened batch*sequence axis 0) with a feature axis last.

    Every later token attends to the first one, so its activations reach every output of the sample (the
    "attention sink"); OPTQ can weigh these rows more (calib.weights.hessian).
    """
    if not layout.has_dims or x.ndim < 2:
        return None
    if layout.flattened:
        if mask is None or x.ndim != 2 or x.shape[0] != mask.size:
            return None
        m = np.asarray(mask, dtype=bool)
        samples = np.flatnonzero(m.any(axis=1)).astype(np.int64)
        return x[samples * m.shape[1] + np.argmax(m[samples], axis=1)], samples
    if layout.token_axes != (1,) or x.ndim != 3:
        return None
    if mask is None:
        return x[:, 0, :], np.arange(x.shape[0], dtype=np.int64)
    m = np.asarray(mask, dtype=bool)
    if m.shape != x.shape[:2]:
        return None
    samples = np.flatnonzero(m.any(axis=1)).astype(np.int64)
    return x[samples, np.argmax(m[samples], axis=1)], samples


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
        flat = keep_full.reshape(-1)
        return (rows2d, row_ids) if flat.all() else (rows2d[flat], row_ids)
    if x.shape[0] != mask.shape[0]:
        raise CalibrationError(f"tensor batch axis {x.shape[0]} does not match the attention mask {mask.shape}")
    mask = np.asarray(mask, dtype=bool)
    axes = [len(x.shape) - 1 if a == -1 else a for a in layout.token_axes]
    row_ids = None
    if ids is not None and len(axes) == 1 and layout.has_dims:
        row_ids = np.asarray(_broadcast_mask(ids, lead, axes[0]))[_broadcast_mask(mask, lead, axes[0])]
    lengths = prefix_lengths(mask)
    if lengths is not None and bool((lengths == mask.shape[1]).all()):
        return rows2d, row_ids
    if lengths is not None and not layout.has_dims:  # a full-size element mask would cost more than the copy
        return _prefix_slices(x, axes, lengths, rows2d.shape[1]), row_ids
    keep_full = np.ones(lead, dtype=bool)
    for axis in axes:
        keep_full = keep_full & _broadcast_mask(mask, lead, axis).astype(bool)
    flat = keep_full.reshape(-1)
    if flat.all():
        return rows2d, row_ids
    return rows2d[flat], row_ids


def token_row_max(x: F32, layout: TensorLayout, mask: Mask | None,
                  ids: I64 | None) -> tuple[F32, I64, int] | None:
    """Per valid token position (b, s): max|x| over every row of that position, its id and the rows it stands for.

    Only for a tensor with one token axis and further lead axes besides the batch (an attention operand
    [B, H, S, d]): its rows (b, h, s) are short, and reducing the heads first (a vectorised pass) leaves
    one row per (b, s) instead of H; the token observer then counts each (b, s) H times. None otherwise.

        x [B, H, S, d] --max, min over H--> [B, S, d] --max(hi, -lo), max over d--> [B, S] --mask--> rows
    """
    if ids is None or mask is None or layout.flattened or len(layout.token_axes) != 1 or not layout.has_dims:
        return None
    token = layout.token_axes[0]
    groups = tuple(a for a in range(1, x.ndim - 1) if a != token)
    if not groups or token == 0 or x.shape[0] != mask.shape[0]:
        return None
    hi = x.max(axis=groups)
    lo = x.min(axis=groups)
    np.negative(lo, out=lo)
    np.maximum(hi, lo, out=hi)
    per_position: F32 = hi.max(axis=-1)
    repeats = int(np.prod([x.shape[a] for a in groups]))
    keep = np.asarray(mask, dtype=bool)
    return per_position[keep], np.asarray(ids)[keep], repeats
