"""Profiling stage: inputs of a chosen batch x sequence shape for latency runs.

Token inputs (``input_ids``, ``attention_mask``, ``token_type_ids``) are real text: gensim's Lee
background documents, tokenized and truncated to exactly ``seq`` tokens (every document is longer than
128 tokens, so no row is padding). Other float inputs get a fixed ramp in [-1, 1]; latency does not
depend on their values. Axis 0 is the batch and axis 1 the sequence wherever the model leaves them dynamic.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from calib.errors import ConfigError
from calib.onnx_file import read_graph

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

_ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """A graph input: dtype (numpy name) and dims (None = dynamic)."""

    name: str
    dtype: str
    dims: tuple[int | None, ...]


def onnx_inputs(model_path: Path) -> tuple[InputSpec, ...]:
    """Graph inputs of an ONNX file (initializers excluded), read without loading the weights."""
    model = read_graph(model_path)
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        if tensor.elem_type not in _ONNX_DTYPES:
            raise ConfigError(f"input {value.name!r} has ONNX element type {tensor.elem_type}; cannot feed it")
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        specs.append(InputSpec(name=value.name, dtype=_ONNX_DTYPES[tensor.elem_type], dims=dims))
    return tuple(specs)


def _shape(spec: InputSpec, batch: int, seq: int) -> tuple[int, ...]:
    shape = []
    for axis, dim in enumerate(spec.dims):
        if dim is not None:
            shape.append(dim)
        elif axis in (0, 1):
            shape.append(batch if axis == 0 else seq)
        else:
            raise ConfigError(f"input {spec.name!r} has a dynamic axis {axis}; only batch (0) and sequence (1) can be")
    return tuple(shape)


@functools.lru_cache(maxsize=4)
def _token_rows(tokenizer_json: str, seq: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    from calib.data import lee_background_documents
    from calib.tokenize import load_tokenizer

    docs = lee_background_documents()[:rows]
    tokenizer = load_tokenizer(Path(tokenizer_json), max_length=seq, pad_to=seq)
    encodings = tokenizer.encode_batch(docs)
    ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
    return ids, mask


def make_feeds(
    inputs: Sequence[InputSpec], batch: int, seq: int, tokenizer_json: Path | None
) -> Mapping[str, np.ndarray]:
    """One feed dict of shape [batch, seq, ...] for ``inputs``."""
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = _shape(spec, batch, seq)
        if spec.name in TOKEN_INPUTS:
            if tokenizer_json is None:
                raise ConfigError(f"input {spec.name!r} takes token ids: pass --tokenizer path/to/tokenizer.json")
            ids, mask = _token_rows(str(tokenizer_json), shape[1], 64)
            rows = np.resize(np.arange(len(ids)), shape[0])
            source = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}[spec.name]
            feeds[spec.name] = source[rows].astype(spec.dtype)
        elif spec.dtype.startswith("float"):
            size = int(np.prod(shape))
            feeds[spec.name] = np.linspace(-1.0, 1.0, size, dtype=np.float32).reshape(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds
