"""Calibration stage: texts -> padded int64 feeds (``input_ids``, ``attention_mask``) for ONNX Runtime.

Uses the model's own ``tokenizer.json`` through the lean ``tokenizers`` library (imported lazily). Each batch
is padded to its longest member (or to ``pad_to``), truncated to ``max_length``; the attention mask is 1 on
real tokens and 0 on padding, which the collector uses to exclude padding from every statistic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError, ConfigError

Feed = dict[str, npt.NDArray[np.int64]]


def load_tokenizer(tokenizer_json: Path, max_length: int = 128, pad_to: int | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` with truncation at ``max_length`` and padding to the longest (or ``pad_to``)."""
    from tokenizers import Tokenizer

    if max_length < 1:
        raise ConfigError(f"max_length {max_length} must be at least 1")
    if not Path(tokenizer_json).is_file():
        raise ConfigError(f"tokenizer file {tokenizer_json} does not exist")
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    padding = tokenizer.padding or {}
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(
        pad_id=int(padding.get("pad_id", 0)),
        pad_token=str(padding.get("pad_token", "[PAD]")),
        pad_type_id=int(padding.get("pad_type_id", 0)),
        length=pad_to,
    )
    return tokenizer


def encode(texts: Sequence[str], tokenizer_json: Path, max_length: int = 128, batch_size: int = 16,
           pad_to: int | None = None, *, sort_by_length: bool = False) -> Iterator[Feed]:
    """Yield feeds ``{"input_ids", "attention_mask"}`` (int64 [batch, seq]) in text order.

    ``sort_by_length`` orders the texts by token count, longest first (stable), before batching: batches then
    need far less padding (fewer tokens to run), and the first batch, which fixes the histogram bin width,
    holds the longest texts.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size {batch_size} must be at least 1")
    if not texts:
        raise CalibrationError("no calibration texts to encode")
    tokenizer = load_tokenizer(tokenizer_json, max_length, pad_to)
    if sort_by_length:
        lengths = [sum(e.attention_mask) for e in tokenizer.encode_batch(list(texts))]
        texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: -lengths[i])]
    for start in range(0, len(texts), batch_size):
        encodings = tokenizer.encode_batch(list(texts[start:start + batch_size]))
        yield {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
        }


def token_strings(tokenizer_json: Path, ids: Sequence[int]) -> list[str]:
    """The vocabulary strings of token ``ids`` (for reports)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    return [tokenizer.id_to_token(int(i)) or f"<{int(i)}>" for i in ids]
