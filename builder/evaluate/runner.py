"""Evaluation stage: run a (possibly quantized) model in ONNX Runtime on the CPU; sentence embeddings.

Texts are ordered by length before batching so padding stays small, then results are put back in the caller's
order. Models that contain our plugin nodes are evaluated through their NumPy references, registered as
ONNX Runtime custom ops by :mod:`plugins.ort_ops` (optional: a clear error names what is missing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from calib.errors import BackendUnavailable, ConfigError, GraphError, suggest
from calib.outputs import run_failure
from calib.text_encoder import EncodedBatch, TextEncoder

logger = logging.getLogger(__name__)

EMBEDDING_OUTPUT = "sentence_embedding"
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_LENGTH = 128

Feeds = dict[str, npt.NDArray[Any]]


def custom_domains(model: onnx.ModelProto) -> set[str]:
    """Domains of nodes that ONNX Runtime does not implement itself (our plugin nodes)."""
    return {n.domain for n in model.graph.node if n.domain not in STANDARD_DOMAINS}


def _session_for(model: onnx.ModelProto, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # block-wise INT4 weight DQ + MatMul fuses to MatMulNBits, which by default quantizes its float input to INT8;
    # keep the input float, as a weight-only (W4A16) engine does
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if custom_domains(model):
        try:
            from onnxruntime_extensions import get_library_path

            from plugins import ort_ops
        except ImportError as exc:
            raise BackendUnavailable(
                f"the model has plugin nodes (domains {sorted(custom_domains(model))}); evaluating them needs "
                "plugins.ort_ops and onnxruntime-extensions: `pip install 'build-engine[plugins]'`"
            ) from exc
        ort_ops.register_reference_ops()
        options.register_custom_ops_library(get_library_path())
        model = ort_ops.ort_evaluable_copy(model)
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own exception types for unloadable graphs
        raise GraphError(f"ONNX Runtime cannot load the model: {exc}") from exc


def with_outputs(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate ``tensors`` (types inferred by ONNX Runtime)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    for name in tensors:
        if name not in existing:
            copy.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            existing.add(name)
    return copy


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name produced by a node or fed as a graph input."""
    names = {i.name for i in model.graph.input}
    for node in model.graph.node:
        names.update(o for o in node.output if o)
    return names


class OrtRunner:
    """One ONNX Runtime CPU session over an in-memory model, optionally exposing intermediate tensors."""

    def __init__(self, model: onnx.ModelProto, extra_outputs: Sequence[str] = (), threads: int = 0) -> None:
        produced = tensor_names(model)
        missing = [t for t in extra_outputs if t not in produced]
        if missing:
            raise GraphError(f"tensor {missing[0]!r} is not in the model{suggest(missing[0], produced)}")
        self.model = model
        # the copy with extra outputs lives only while the session is built (a large model is not held twice)
        self.session = _session_for(with_outputs(model, extra_outputs) if extra_outputs else model, threads)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self.fixed_batch = _fixed_batch(self.session)

    def run(self, feeds: Feeds, outputs: Sequence[str]) -> list[npt.NDArray[Any]]:
        """Run one batch; ``feeds`` may hold extra inputs the model does not take."""
        unknown = [o for o in outputs if o not in self.output_names]
        if unknown:
            raise GraphError(f"the model has no output {unknown[0]!r}{suggest(unknown[0], self.output_names)}")
        absent = [n for n in self.input_names if n not in feeds]
        if absent:
            raise ConfigError(f"the model needs input {absent[0]!r}; the feeds hold {sorted(feeds)}")
        chosen = {n: feeds[n] for n in self.input_names}
        rows = _rows(chosen)
        fixed = self.fixed_batch
        if fixed is None or rows is None or rows == fixed:
            return self._session_run(list(outputs), chosen)
        return self._run_in_fixed_batches(chosen, list(outputs), rows, fixed)

    def _session_run(self, outputs: list[str], feeds: Feeds) -> list[npt.NDArray[Any]]:
        try:
            return [np.asarray(r) for r in self.session.run(outputs, feeds)]
        except Exception as exc:  # ONNX Runtime's Fail, InvalidArgument, RuntimeException
            shapes, reason = run_failure(feeds, exc)
            raise GraphError(f"ONNX Runtime cannot run the model on inputs {shapes}: {reason}") from exc

    def _run_in_fixed_batches(self, feeds: Feeds, outputs: list[str], rows: int, fixed: int
                              ) -> list[npt.NDArray[Any]]:
        """Run a batch of ``rows`` through a model that takes exactly ``fixed`` rows: in slices of ``fixed``
        (the last one filled up with copies of its last row, whose outputs are dropped), outputs joined on axis 0."""
        parts: list[list[npt.NDArray[Any]]] = []
        for start in range(0, rows, fixed):
            take = min(fixed, rows - start)
            piece = {n: np.concatenate([v[start:start + take]] + [v[start + take - 1:start + take]] * (fixed - take))
                     for n, v in feeds.items()}
            got = self._session_run(outputs, piece)
            for name, value in zip(outputs, got, strict=True):
                if value.ndim == 0 or value.shape[0] % fixed:
                    raise ConfigError(f"the model takes batches of exactly {fixed} and its output {name!r} of shape "
                                      f"{list(value.shape)} has no batch axis to join; evaluate it with batches of "
                                      f"{fixed}")
            parts.append([v[: v.shape[0] // fixed * take] for v in got])
        return [np.concatenate(column) for column in zip(*parts, strict=True)]


def _fixed_batch(session: Any) -> int | None:
    """The batch size the model's inputs declare as a constant (an export with a static batch), or None."""
    sizes = {i.shape[0] for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    dynamic = any(i.shape and not isinstance(i.shape[0], int) for i in session.get_inputs())
    return next(iter(sizes)) if len(sizes) == 1 and not dynamic else None


def _rows(feeds: Feeds) -> int | None:
    """The common axis-0 size of the feeds (None when they disagree or are scalars)."""
    sizes = {np.shape(v)[0] for v in feeds.values() if np.ndim(v) >= 1}
    return next(iter(sizes)) if len(sizes) == 1 else None


def length_order(texts: Sequence[str]) -> npt.NDArray[np.int64]:
    """Indices that sort ``texts`` by character length (stable), so batches need little padding."""
    return np.argsort(np.asarray([len(t) for t in texts], dtype=np.int64), kind="stable")


def batches(
    texts: Sequence[str],
    tokenizer_json: Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Iterator[tuple[npt.NDArray[np.int64], Feeds]]:
    """Tokenized batches in length order, each with the indices (into ``texts``) of its rows."""
    from calib.tokenize import encode

    if not texts:
        raise ConfigError("no texts to evaluate")
    if tokenizer_json is None:
        from builder.intake.minilm import tokenizer_json_path

        tokenizer_json = tokenizer_json_path()
    order = length_order(texts)
    feeds = encode([texts[int(i)] for i in order], tokenizer_json, max_length=max_length, batch_size=batch_size)
    start = 0
    for feed in feeds:
        rows = int(feed["attention_mask"].shape[0])
        yield order[start : start + rows], feed
        start += rows
    if start != len(texts):
        raise ConfigError(f"the tokenizer produced {start} rows for {len(texts)} texts")


def embed(
    model: onnx.ModelProto | OrtRunner,
    texts: Sequence[str],
    tokenizer_json: Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> npt.NDArray[np.float32]:
    """Pooled sentence embeddings ``[len(texts), hidden]`` (the model's ``sentence_embedding`` output)."""
    runner = model if isinstance(model, OrtRunner) else OrtRunner(model)
    out: npt.NDArray[np.float32] | None = None
    for rows, feed in batches(texts, tokenizer_json, batch_size, max_length):
        (emb,) = runner.run(feed, [EMBEDDING_OUTPUT])
        if out is None:
            out = np.zeros((len(texts), emb.shape[-1]), dtype=np.float32)
        out[rows] = emb.astype(np.float32)
        if not np.all(np.isfinite(emb)):
            raise GraphError(f"the model produced non-finite embeddings for rows {rows[:4].tolist()}...")
    assert out is not None  # batches() rejects empty input
    return out


@dataclass(frozen=True, kw_only=True)
class Pooling:
    """Where a sentence embedding comes from: a pooled output as is, or the masked mean of a hidden state."""

    output: str
    mean: bool  # True: attention-masked mean over the sequence of a [batch, seq, hidden] output, L2-normalized

    @property
    def description(self) -> str:
        if self.mean:
            return f"masked mean of output {self.output!r}, L2-normalized"
        return f"output {self.output!r}"

    def apply(self, values: npt.NDArray[Any], mask: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Embeddings ``[batch, hidden]`` from the output ``values`` of one batch."""
        x = np.asarray(values, dtype=np.float32)
        if not self.mean:
            return x.reshape(x.shape[0], -1)
        m = mask.astype(np.float32)[:, :, None]
        pooled = (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), np.float32(1e-9))
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))
        return np.asarray(pooled / norms, dtype=np.float32)


def encoder_batches(
    encoder: TextEncoder, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Iterator[tuple[npt.NDArray[np.int64], EncodedBatch]]:
    """Batches of ``texts`` in length order (as :func:`batches`), each with the indices of its rows."""
    if not texts:
        raise ConfigError("no texts to evaluate")
    order = length_order(texts)
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        yield rows, encoder.encode([texts[int(i)] for i in rows], max_length)


def embed_texts(
    runner: OrtRunner,
    encoder: TextEncoder,
    texts: Sequence[str],
    pooling: Pooling,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    step: Callable[[int], None] | None = None,
) -> npt.NDArray[np.float32]:
    """Sentence embeddings ``[len(texts), hidden]`` through ``pooling``; ``step(1)`` after each batch."""
    out: npt.NDArray[np.float32] | None = None
    for rows, batch in encoder_batches(encoder, texts, batch_size, max_length):
        (values,) = runner.run(batch.feeds, [pooling.output])
        emb = pooling.apply(values, batch.mask)
        if out is None:
            out = np.zeros((len(texts), emb.shape[-1]), dtype=np.float32)
        out[rows] = emb
        if not np.all(np.isfinite(emb)):
            raise GraphError(f"the model produced non-finite embeddings for rows {rows[:4].tolist()}...")
        if step is not None:
            step(1)
    assert out is not None  # encoder_batches rejects empty input
    return out
