"""Calibration stage: folding one batch of observed tensors into their observers, on several threads.

The collector (calib.collect) hands each batch's activations to a :class:`Folder`. NumPy releases the GIL in
its loops (``bincount`` included), so the tensors of a batch fold in parallel shares, and beside the ONNX
Runtime inference of the next batch. Every tensor is folded by one thread, in batch order, and the fold
itself does not depend on the thread, so the Statistics are the same bit for bit whatever the thread count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from calib import fused
from calib.layout import TensorLayout, first_token_rows, token_row_max, valid_rows
from calib.observers import FirstRows, Scratch, TokenRows
from calib.statistics import TensorStatistics

Mask = npt.NDArray[np.bool_]
FUSED = fused.available()  # False: Numba is missing, every tensor takes the reference path


class Folder:
    """Folds each batch on ``threads`` threads, each owning a fixed share of the tensors and its own scratch.

    Shares are balanced by the sizes of the first batch's tensors (largest first onto the lightest share).
    """

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self.groups: list[list[int]] = []
        self.scratch = [Scratch() for _ in range(self.threads)]
        self.pool = ThreadPoolExecutor(max_workers=self.threads - 1) if self.threads > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def _partition(self, outputs: Sequence[npt.NDArray[Any]]) -> None:
        loads = [0] * self.threads
        self.groups = [[] for _ in range(self.threads)]
        for index in sorted(range(len(outputs)), key=lambda i: -int(np.size(outputs[i]))):
            lightest = loads.index(min(loads))
            self.groups[lightest].append(index)
            loads[lightest] += int(np.size(outputs[index]))

    def fold(self, stats: Mapping[str, TensorStatistics], layouts: Mapping[str, TensorLayout],
             names: Sequence[str], outputs: Sequence[npt.NDArray[Any]], *, batch: int, mask: Mask | None,
             ids: npt.NDArray[Any] | None) -> None:
        """Fold tensor ``names[i]`` = ``outputs[i]`` of batch number ``batch`` (padding per ``mask``)."""
        if sum(map(len, self.groups)) != len(outputs):
            self._partition(outputs)

        masks = fused.BatchMasks(mask)

        def work(group: int) -> None:
            for index in self.groups[group]:
                name = names[index]
                observe(stats[name], layouts[name], outputs[index], mask, ids, batch=batch,
                        scratch=self.scratch[group], masks=masks)

        if self.pool is None:
            work(0)
            return
        futures = [self.pool.submit(work, g) for g in range(1, self.threads)]
        try:
            work(0)
        finally:
            for future in futures:
                future.exception()  # every share has finished before a failure propagates
        for future in futures:
            future.result()


def observe(stats: TensorStatistics, layout: TensorLayout, value: npt.NDArray[Any], mask: Mask | None,
            ids: npt.NDArray[Any] | None, *, batch: int, scratch: Scratch | None = None,
            masks: fused.BatchMasks | None = None) -> None:
    """Fold one tensor of one batch (padding excluded) into its observers: the fused kernels (calib.fused) when
    they apply, else the reference path (valid rows, then each observer)."""
    x = np.asarray(value, dtype=np.float32)
    if layout.batch_group > 1:  # [B*H, ...] merged by the export: read as [B, H, ...]
        view, layout = layout.split_batch(x)
        x = np.asarray(view, dtype=np.float32)
    if FUSED and fused.fusable(stats, layout, x, mask) and fused.fold(stats, layout, x, masks or fused.BatchMasks(mask),
                                                                       ids):
        return
    token_ids = None if stats.tokens is None else ids
    rows, row_ids = valid_rows(x, layout, mask, token_ids)
    reduced = token_row_max(x, layout, mask, token_ids)
    stats.update(rows, row_ids, batch=batch, scratch=scratch,
                 token_rows=None if reduced is None else TokenRows(*reduced),
                 first_rows=_first_rows(stats, layout, x, mask, batch))


SAMPLES_PER_BATCH_ID = 1 << 24  # global sample id = batch index * this + index in the batch


def _first_rows(stats: TensorStatistics, layout: TensorLayout, x: npt.NDArray[np.float32], mask: Mask | None,
                batch: int) -> FirstRows | None:
    """Each sample's first-token row with its global sample id, for the tensors a Hessian is collected of."""
    if "hessian" not in stats.observers:
        return None
    found = first_token_rows(x, layout, mask)
    if found is None:
        return None
    rows, samples = found
    return FirstRows(np.ascontiguousarray(rows, dtype=np.float32), batch * SAMPLES_PER_BATCH_ID + samples)
