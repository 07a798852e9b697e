"""Calibration stage: a checked text encoder -- texts (or token ids) -> feeds for one specific ONNX model.

:func:`open_text_encoder` finds the model's tokenizer (:mod:`calib.tokenizer_files`), maps its inputs onto the
text roles (:mod:`calib.model_inputs`) and, before anything runs, checks the tokenizer against the model's
embedding table: a tokenizer whose largest id does not fit the table, or one with far fewer ids than the
table has rows (another model's tokenizer), is a ConfigError (exit 2) naming both sizes.

Feeds follow the model: ids, mask and token types in the dtypes its inputs declare; position ids from the
mask (``cumsum(mask) - 1``, so right padding keeps positions 0..n-1); KV-cache inputs empty (past length 0),
so a decoder graph runs full sequences as a prefill.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from calib.errors import CalibrationError, ConfigError
from calib.model_inputs import ModelInputs, embedding_rows, model_inputs
from calib.onnx_file import read_graph
from calib.tokenizer_files import TokenizerFile, find_tokenizer, load_tokenizer_file

logger = logging.getLogger(__name__)

Feeds = dict[str, npt.NDArray[Any]]
MIN_VOCAB_FRACTION = 0.9  # a tokenizer with fewer ids than this share of the table's rows is another model's
_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>")


def check_vocabulary(largest_id: int, vocab_size: int, rows: int | None, where: str) -> None:
    """Raise ConfigError when the tokenizer cannot belong to an embedding table of ``rows`` rows."""
    if rows is None:
        logger.warning("%s: no embedding table found for the token ids; the tokenizer size is not checked", where)
        return
    if largest_id >= rows:
        raise ConfigError(
            f"{where}: the tokenizer's largest token id is {largest_id} ({vocab_size} ids) but the model's "
            f"embedding table has {rows} rows; this tokenizer does not belong to the model (pass --tokenizer)"
        )
    if vocab_size < MIN_VOCAB_FRACTION * rows:
        raise ConfigError(
            f"{where}: the tokenizer has {vocab_size} ids but the model's embedding table has {rows} rows "
            f"(fewer than {MIN_VOCAB_FRACTION:.0%}); this tokenizer does not belong to the model (pass --tokenizer)"
        )


@dataclass(frozen=True, kw_only=True)
class EncoderInfo:
    """What the encoder was built from (for reports and cache keys)."""

    tokenizer: TokenizerFile
    vocab_size: int
    largest_id: int
    embedding_rows: int | None
    inputs: ModelInputs


@dataclass(frozen=True, kw_only=True)
class EncodedBatch:
    """One batch: the model's feeds, plus the token ids and attention mask ([batch, seq] int64) behind them
    (the mask is here even when the model takes none)."""

    feeds: Feeds
    ids: npt.NDArray[np.int64]
    mask: npt.NDArray[np.int64]


class TextEncoder:
    """Turns texts (or token-id matrices) into feeds for one model; built by :func:`open_text_encoder`."""

    def __init__(self, tokenizer: Any, info: EncoderInfo) -> None:
        self._tokenizer = tokenizer
        self.info = info
        self.inputs = info.inputs
        self.max_positions: int | None = None  # the model's position table, when known: no text is cut longer
        padding = tokenizer.padding or {}
        self.pad_id = int(padding["pad_id"]) if "pad_id" in padding else self._find_pad_id()

    def _find_pad_id(self) -> int:
        for token in _PAD_TOKENS:
            found = self._tokenizer.token_to_id(token)
            if found is not None:
                return int(found)
        return 0  # masked out everywhere; any valid id will do

    def _untruncated(self) -> None:
        # the tokenizers object keeps the truncation and padding of the last batch; whole texts need neither
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (for language-model corpora and prompts)."""
        self._untruncated()
        return [int(i) for i in self._tokenizer.encode(text, add_special_tokens=False).ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ``ids``."""
        return str(self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False))

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` with the tokenizer's own special tokens (a BOS where it adds one)."""
        self._untruncated()
        return [int(i) for i in self._tokenizer.encode(text).ids]

    def encode_batch(self, texts: Sequence[str], max_length: int = 128, pad_to: int | None = None) -> Feeds:
        """One padded batch's feeds (special tokens added, truncated to ``max_length``, padded to the longest)."""
        return self.encode(texts, max_length, pad_to).feeds

    def encode(self, texts: Sequence[str], max_length: int = 128, pad_to: int | None = None) -> EncodedBatch:
        """One padded batch with its ids and mask (see :meth:`encode_batch`)."""
        if max_length < 1:
            raise ConfigError(f"max_length {max_length} must be at least 1")
        max_length = self.fit(max_length)
        self._tokenizer.enable_truncation(max_length=max_length)
        pad_token = self._tokenizer.id_to_token(self.pad_id) or "[PAD]"
        self._tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad_token, length=pad_to)
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        types = np.asarray([e.type_ids for e in encodings], dtype=np.int64)
        return EncodedBatch(feeds=self.feed_from_ids(ids, mask, types), ids=ids, mask=mask)

    def feeds(self, texts: Sequence[str], max_length: int = 128, batch_size: int = 16, pad_to: int | None = None,
              *, sort_by_length: bool = False) -> Iterator[Feeds]:
        """Batches of feeds in text order (``sort_by_length``: longest first), as :func:`calib.tokenize.encode`."""
        if batch_size < 1:
            raise ConfigError(f"batch_size {batch_size} must be at least 1")
        if not texts:
            raise CalibrationError("no texts to encode")
        if sort_by_length:
            self._tokenizer.enable_truncation(max_length=self.fit(max_length))
            self._tokenizer.no_padding()
            lengths = [len(e.ids) for e in self._tokenizer.encode_batch(list(texts))]
            texts = [texts[i] for i in sorted(range(len(texts)), key=lambda i: -lengths[i])]
        for start in range(0, len(texts), batch_size):
            yield self.encode_batch(texts[start:start + batch_size], max_length, pad_to)

    def fit(self, length: int) -> int:
        """``length`` capped at the model's position table (a longer sequence cannot run)."""
        return length if self.max_positions is None else min(length, self.max_positions)

    def feed_from_ids(self, ids: npt.ArrayLike, mask: npt.ArrayLike | None = None,
                      token_types: npt.ArrayLike | None = None) -> Feeds:
        """Feeds for token ids ``[batch, seq]`` (mask all ones by default; KV cache empty)."""
        ids_arr = np.asarray(ids, dtype=np.int64)
        if ids_arr.ndim != 2:
            raise ConfigError(f"token ids must be [batch, seq], got shape {ids_arr.shape}")
        mask_arr = np.ones_like(ids_arr) if mask is None else np.asarray(mask, dtype=np.int64)
        largest = int(ids_arr.max()) if ids_arr.size else 0
        rows = self.info.embedding_rows
        if rows is not None and largest >= rows:
            raise ConfigError(f"token id {largest} is outside the model's embedding table of {rows} rows")
        roles = self.inputs
        feeds: Feeds = {roles.tokens: ids_arr.astype(roles.dtypes[roles.tokens])}
        if roles.mask is not None:
            feeds[roles.mask] = mask_arr.astype(roles.dtypes[roles.mask])
        if roles.token_types is not None:
            types = np.zeros_like(ids_arr) if token_types is None else np.asarray(token_types, dtype=np.int64)
            feeds[roles.token_types] = types.astype(roles.dtypes[roles.token_types])
        if roles.positions is not None:
            positions = np.maximum(np.cumsum(mask_arr, axis=1) - 1, 0)
            feeds[roles.positions] = positions.astype(roles.dtypes[roles.positions])
        feeds.update(self.empty_cache(ids_arr.shape[0]))
        return feeds

    def empty_cache(self, batch: int) -> Feeds:
        """Past-length-0 arrays for every KV-cache input."""
        out: Feeds = {}
        for cache in self.inputs.cache:
            shape = [batch if axis == 0 else 0 if axis == cache.past_axis else int(d or 0)
                     for axis, d in enumerate(cache.dims)]
            out[cache.name] = np.zeros(shape, dtype=cache.dtype)
        return out


def _load_graph(model: Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if not Path(model).is_file():
        raise ConfigError(f"model file {model} does not exist")
    return read_graph(Path(model))  # structure only: weights stay on disk


def open_text_encoder(
    model: Path | onnx.ModelProto,
    tokenizer: Path | None = None,
    input_map: Mapping[str, str] | None = None,
    *,
    model_paths: Sequence[Path] = (),
    known_tokenizer: Path | None = None,
) -> TextEncoder:
    """A text encoder for ``model``, checked against it before any run.

    ``tokenizer``: the user's ``--tokenizer`` (file or folder); otherwise one is searched next to ``model``
    (when it is a path) and ``model_paths``; ``known_tokenizer`` is the last resort for a model the caller
    has identified (the bundled MiniLM). ``input_map``: ``{role: input name}`` overriding the inferred names.
    """
    graph = _load_graph(model)
    paths = ([Path(model)] if not isinstance(model, onnx.ModelProto) else []) + [Path(p) for p in model_paths]
    found = find_tokenizer(paths, explicit=tokenizer, known=known_tokenizer)
    inputs = model_inputs(graph, input_map)
    loaded = load_tokenizer_file(found)
    vocab = loaded.get_vocab(with_added_tokens=True)
    largest = max(vocab.values()) if vocab else -1
    rows = embedding_rows(graph, inputs.tokens)
    where = str(paths[0]) if paths else (graph.graph.name or "the model")
    check_vocabulary(largest, len(vocab), rows, where)
    logger.info("tokenizer %s (%s): %d ids; embedding table %s rows; inputs %s", found.path, found.reason,
                len(vocab), rows, inputs.role_map())
    info = EncoderInfo(tokenizer=found, vocab_size=len(vocab), largest_id=largest, embedding_rows=rows,
                       inputs=inputs)
    return TextEncoder(loaded, info)
