"""Evaluation stage: language-model figures on held-out text (perplexity, next-token agreement, KL).

Windows: the evaluation documents of the corpus split (:func:`calib.data.corpus_split`) are tokenized
without special tokens, each followed by the tokens of a blank line, and concatenated; the stream is cut into
non-overlapping windows of ``window`` tokens from its start, the first ``windows`` of them. Each window runs
as one full sequence (empty KV cache); its first token is context only, so it predicts ``window - 1`` tokens.

    perplexity = exp( sum of -log p(token_t | tokens_<t) over predicted tokens / predicted tokens )

The FP32 side stores, per window, the NLL of every predicted token (float64) and the argmax of every position (from
float32 logits: exact) and the logits in float16 (the reference distribution of the KL and of the per-output
cosine and errors, which therefore carry float16 rounding: about 2e-4 relative error for FP32 against itself).
A re-run from the cache and a first run compute the same figures because the model is always compared with
the float16-rounded reference logits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from builder.evaluate.fidelity import FidelityAccumulator, kl_rows, log_softmax
from builder.evaluate.runner import OrtRunner
from builder.evaluate.survey import Survey
from calib.data import CorpusSplit
from calib.errors import CalibrationError, GraphError
from calib.text_encoder import TextEncoder

FP16_MAX = 60000.0  # arrays with larger magnitudes are stored in float32
DOC_SEPARATOR = "\n\n"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Windows:
    """Token windows ``[windows, window]`` cut from the evaluation slice of a corpus."""

    corpus: str
    ids: npt.NDArray[np.int64]

    @property
    def predicted(self) -> int:
        return int(self.ids.shape[0] * (self.ids.shape[1] - 1))


def lm_windows(encoder: TextEncoder, split: CorpusSplit, window: int, windows: int) -> Windows:
    """The first ``windows`` non-overlapping windows of ``window`` tokens of the evaluation slice."""
    if window < 2 or windows < 1:
        raise CalibrationError(f"perplexity needs windows of at least 2 tokens and at least 1 window; got "
                               f"{windows} x {window}")
    if encoder.fit(window) < window:
        logger.warning("perplexity window %d is longer than the model's %d positions; windows of %d tokens are used",
                       window, encoder.fit(window), encoder.fit(window))
        window = encoder.fit(window)
    need = window * windows
    stream: list[int] = []
    separator = encoder.token_ids(DOC_SEPARATOR)
    for doc in split.evaluation:
        stream.extend(encoder.token_ids(doc))
        stream.extend(separator)
        if len(stream) >= need:
            break
    full = len(stream) // window
    if full < 1:
        raise CalibrationError(f"the evaluation slice of {split.source!r} holds {len(stream)} tokens, fewer than "
                               f"one window of {window}")
    count = min(full, windows)
    ids = np.asarray(stream[: count * window], dtype=np.int64).reshape(count, window)
    return Windows(corpus=split.rule, ids=ids)


def storable(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """A float output as stored in the reference: float16 when its magnitudes fit, else float32."""
    arr = np.asarray(values)
    if arr.size and float(np.max(np.abs(arr))) < FP16_MAX:
        return arr.astype(np.float16)
    return arr.astype(np.float32)


def nll_top1(logits: npt.NDArray[Any], ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.float64],
                                                                          npt.NDArray[np.int64]]:
    """NLL of each next token and the argmax of each predicting position, for one window."""
    pred = np.asarray(logits[:-1], dtype=np.float32)
    nll = np.empty(pred.shape[0], dtype=np.float64)
    for start in range(0, pred.shape[0], 256):  # float64 log-softmax a chunk at a time
        chunk = log_softmax(pred[start:start + 256])
        nll[start:start + 256] = -chunk[np.arange(chunk.shape[0]), ids[start + 1:start + 1 + chunk.shape[0]]]
    return nll, np.argmax(pred, axis=-1).astype(np.int64)


def reference_windows(runner: OrtRunner, survey: Survey, encoder: TextEncoder, windows: Windows,
                      arrays: MutableMapping[str, npt.NDArray[Any]], step: Callable[[int], None]) -> None:
    """Run the FP32 model over every window; store NLL, argmax and the compared outputs into ``arrays``."""
    assert survey.logits is not None
    names = list(dict.fromkeys([survey.logits, *(o.name for o in survey.outputs)]))
    for index, ids in enumerate(windows.ids):
        values = dict(zip(names, runner.run(encoder.feed_from_ids(ids[None]), names), strict=True))
        logits = values[survey.logits][0]
        if not np.all(np.isfinite(logits)):
            raise GraphError("the FP32 model produced non-finite logits")
        nll, _ = nll_top1(logits, ids)
        arrays[f"lm/nll/{index}"] = nll  # float64, as the model side sums it
        arrays[f"lm/argmax/{index}"] = np.argmax(np.asarray(logits), axis=-1).astype(np.int32)  # every position
        for name, value in values.items():
            arrays[f"out/{name}/{index}"] = storable(value)
        step(1)


@dataclass
class LanguageAccumulator:
    """Streams the model's windows against the stored FP32 windows."""

    nll_sum: float = 0.0
    ref_nll_sum: float = 0.0
    count: int = 0
    top1_equal: int = 0
    kl_sum: float = 0.0

    def add(self, logits: npt.NDArray[Any], ids: npt.NDArray[np.int64], ref: Mapping[str, npt.NDArray[Any]]) -> None:
        nll, top1 = nll_top1(logits, ids)
        if not np.all(np.isfinite(nll)):
            raise GraphError("the evaluated model produced non-finite logits")
        self.nll_sum += float(np.sum(nll))
        self.ref_nll_sum += float(np.sum(ref["nll"], dtype=np.float64))
        self.count += int(nll.size)
        self.top1_equal += int(np.sum(top1 == ref["top1"]))
        self.kl_sum += float(np.sum(kl_rows(np.asarray(ref["logits"][:-1]), np.asarray(logits[:-1]))))

    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.count)

    def reference_perplexity(self) -> float:
        return math.exp(self.ref_nll_sum / self.count)


def model_windows(runner: OrtRunner, survey: Survey, encoder: TextEncoder, windows: Windows,
                  arrays: Mapping[str, npt.NDArray[Any]], accumulators: Sequence[FidelityAccumulator],
                  step: Callable[[int], None]) -> LanguageAccumulator:
    """Run the evaluated model over the windows, feeding the LM and per-output accumulators."""
    assert survey.logits is not None
    names = list(dict.fromkeys([survey.logits, *(a.name for a in accumulators)]))
    lm = LanguageAccumulator()
    for index, ids in enumerate(windows.ids):
        values = dict(zip(names, runner.run(encoder.feed_from_ids(ids[None]), names), strict=True))
        argmax = np.asarray(arrays[f"lm/argmax/{index}"])
        ref = {"nll": arrays[f"lm/nll/{index}"], "top1": argmax[:-1],
               "logits": arrays[f"out/{survey.logits}/{index}"][0]}
        lm.add(values[survey.logits][0], ids, ref)
        for acc in accumulators:
            # the FP32 argmax of every position comes from the float32 logits, not their float16 copy
            exact = argmax.reshape(1, -1) if acc.name == survey.logits else None
            acc.add(values[acc.name], arrays[f"out/{acc.name}/{index}"], None, reference_argmax=exact)
        step(1)
    return lm


def reference_perplexity(arrays: Mapping[str, npt.NDArray[Any]], windows: int) -> tuple[float, int]:
    """FP32 perplexity and predicted-token count from the stored NLLs."""
    nll = [np.asarray(arrays[f"lm/nll/{i}"], dtype=np.float64) for i in range(windows)]
    count = sum(int(n.size) for n in nll)
    return math.exp(sum(float(n.sum()) for n in nll) / count), count
