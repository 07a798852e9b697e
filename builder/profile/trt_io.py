"""Profiling stage: host buffers for a TensorRT engine's I/O tensors, for every TensorRT data type.

``trt.nptype`` raises for BF16, FP8, INT4 and FP4 (NumPy has no such types), which made an engine with a
BF16 output unprofilable. Here each TensorRT type maps to a NumPy *storage* type of the same width:
BF16 -> uint16 bits, FP8/E8M0 -> uint8 bytes, INT4/FP4 -> uint8 bytes holding two values each. Latency does not
depend on the values; float feeds are converted to BF16 bits with round-to-nearest-even so a BF16 input
still sees the feed's magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from calib.errors import ConfigError

# TensorRT DataType member name -> (NumPy storage dtype, elements per storage element)
STORAGE: dict[str, tuple[str, int]] = {
    "FLOAT": ("float32", 1), "HALF": ("float16", 1), "BF16": ("uint16", 1), "INT8": ("int8", 1),
    "INT32": ("int32", 1), "INT64": ("int64", 1), "BOOL": ("bool", 1), "UINT8": ("uint8", 1),
    "FP8": ("uint8", 1), "E8M0": ("uint8", 1), "INT4": ("uint8", 2), "FP4": ("uint8", 2),
}


def storage(type_name: str) -> tuple[np.dtype[np.generic], int]:
    """(NumPy storage dtype, values per element) of a TensorRT data type, by member name (``BF16``)."""
    if type_name not in STORAGE:
        raise ConfigError(f"engine tensor type {type_name!r} has no host layout here; known: {', '.join(STORAGE)}")
    name, per = STORAGE[type_name]
    return np.dtype(name), per


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even (NaN kept quiet)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(values.astype(np.float32))
    return np.where(nan, np.uint16(0x7FC0), rounded.astype(np.uint16)).astype(np.uint16)


def host_buffer(type_name: str, shape: Sequence[int], feed: np.ndarray | None = None) -> np.ndarray:
    """A contiguous host array holding a tensor of ``shape`` and TensorRT type ``type_name``.

    With ``feed``: its values converted to the tensor's type (BF16 rounded, packed and FP8 types zeroed:
    their bit layouts have no NumPy counterpart); without: zeros, for an output.
    """
    dtype, per = storage(type_name)
    count = math.prod(shape)
    if per > 1:
        return np.zeros(((count + per - 1) // per,), dtype=dtype)
    if feed is None or type_name in ("FP8", "E8M0"):
        return np.zeros(tuple(shape), dtype=dtype)
    if tuple(feed.shape) != tuple(shape):
        raise ConfigError(f"feed of shape {list(feed.shape)} does not match the tensor shape {list(shape)}")
    if type_name == "BF16":
        return bf16_bits(feed)
    return np.ascontiguousarray(feed.astype(dtype, copy=False))
