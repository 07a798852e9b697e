"""Precision search (evaluation side): the held-out search slice, its FP32 reference and the budget metrics.

The search decides on calibration-side data that calibration did not use, never on the test split:

* sentence encoders: sentences of the VADER probe *train* split (``calib.data.vader_splits`` with the split the
  evaluation uses) that are not calibration sentences; the first ``size`` form the slice, the rest fit the
  FP32 logistic-regression probe behind ``probe-drop``;
* causal language models: passages of the corpus's calibration slice (``calib.data.corpus_split``) that are
  not calibration texts, concatenated and cut into windows as the evaluation cuts its own held-out text.

The FP32 outputs on the slice are computed once and kept in an on-disk cache when a folder is given
(:mod:`builder.evaluate.refcache`, keyed by the model, the tokenizer, the slice and the settings). Metric
definitions follow builder.evaluate: embedding cosine per sentence (the survey's pooling), perplexity from
float64 log-softmax, top-1 agreement with the FP32 argmax at every predicting position.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from builder.evaluate.language import Windows, nll_top1
from builder.evaluate.metrics import Probe
from builder.evaluate.runner import Feeds, OrtRunner, Pooling
from builder.search.budget import ModelKind
from calib.errors import CalibrationError, ConfigError
from calib.text_encoder import TextEncoder

PURPOSE = "precision-search slice"


@dataclass(frozen=True, kw_only=True)
class SearchSlice:
    """The held-out data of one search: sentences (encoders) or token windows (language models)."""

    kind: ModelKind
    description: str
    texts: tuple[str, ...] = ()
    labels: tuple[bool, ...] = ()
    probe_texts: tuple[str, ...] = ()  # fit the FP32 probe (sentence encoders); disjoint from texts
    probe_labels: tuple[bool, ...] = ()
    windows: Windows | None = None

    @property
    def samples(self) -> int:
        return len(self.texts) if self.windows is None else int(self.windows.ids.shape[0])

    def head(self, count: int) -> SearchSlice:
        """The first ``count`` samples (the quick slice of the sensitivity step)."""
        from dataclasses import replace

        if self.windows is not None:
            return replace(self, windows=Windows(corpus=self.windows.corpus, ids=self.windows.ids[:count]),
                           description=f"{self.description} (first {count})")
        return replace(self, texts=self.texts[:count], labels=self.labels[:count],
                       description=f"{self.description} (first {count})")


def sentence_slice(calibration: Collection[str], size: int, seed: int = 0) -> SearchSlice:
    """``size`` VADER train-split sentences that are not calibration texts; the rest of the train split fits the
    probe. The split is the evaluation's (``vader_splits(seed)``), so the test split is never touched."""
    from calib.data import vader_splits

    if size < 8:
        raise ConfigError(f"--slice {size}: the search slice needs at least 8 sentences")
    splits = vader_splits(seed=seed)
    used = set(calibration)
    held = [s for s in splits.train if s.text not in used]
    if len(held) < size + 20:
        raise ConfigError(f"--slice {size}: only {len(held)} probe-train sentences are not calibration texts; use "
                          f"at most {max(len(held) - 20, 0)}")
    test = {s.text for s in splits.test}
    chosen, rest = held[:size], held[size:]
    assert not any(s.text in test for s in held), "the train and test splits overlap"
    return SearchSlice(
        kind=ModelKind.SENTENCE, texts=tuple(s.text for s in chosen), labels=tuple(s.rating > 0 for s in chosen),
        probe_texts=tuple(s.text for s in rest), probe_labels=tuple(s.rating > 0 for s in rest),
        description=(f"{size} VADER probe-train sentences (seed {seed}) that are not among the {len(used)} "
                     "calibration texts; the test split is not used"))


def language_slice(source: str, calibration: Collection[str], encoder: TextEncoder, window: int,
                   windows: int) -> SearchSlice:
    """Windows of the calibration-side passages of ``source`` that calibration did not use."""
    from builder.evaluate.language import lm_windows
    from calib.data import CorpusSplit, corpus_split, passages

    used = set(calibration)
    split = corpus_split(source)
    held = tuple(p for doc in split.calibration for p in passages(doc) if p not in used)
    if not held:
        raise CalibrationError(f"every calibration-side passage of {source!r} is a calibration text; calibrate on "
                               "fewer samples so the search has held-out text")
    cut = lm_windows(encoder, CorpusSplit(source=source, calibration=(), evaluation=held), window, windows)
    description = (f"{cut.ids.shape[0]} windows of {cut.ids.shape[1]} tokens from the {len(held)} calibration-side "
                   f"passages of {source!r} that are not calibration texts; the evaluation slice is not used")
    return SearchSlice(kind=ModelKind.LANGUAGE, windows=Windows(corpus=description, ids=cut.ids),
                       description=description)


@dataclass(frozen=True, kw_only=True)
class SliceScorer:
    """Feeds of the slice, the outputs to fetch, and the FP32 side the metrics compare with."""

    data: SearchSlice
    feeds: tuple[Feeds, ...]
    masks: tuple[npt.NDArray[Any], ...]
    rows: tuple[npt.NDArray[np.int64], ...]  # sentence encoders: each batch's rows in slice order
    fetch: tuple[str, ...]
    pooling: Pooling | None
    reference: Mapping[str, npt.NDArray[Any]]
    probe: Probe | None = None

    def metrics(self, outputs: Sequence[Mapping[str, npt.NDArray[Any]]]) -> dict[str, float]:
        """Every metric of the model whose outputs per batch are ``outputs``."""
        if self.data.kind == ModelKind.LANGUAGE:
            return _language_metrics(self, outputs)
        assert self.pooling is not None
        pooled = [self.pooling.apply(o[self.pooling.output], m) for o, m in zip(outputs, self.masks, strict=True)]
        return _sentence_metrics(self, _in_order(pooled, self.rows))

    def reference_metrics(self) -> dict[str, float]:
        """The FP32 model's own metrics (cosine 1, drop 0, its perplexity, agreement 1)."""
        if self.data.kind == ModelKind.LANGUAGE:
            nll = sum(float(np.sum(self.reference[f"nll/{i}"])) for i in range(len(self.feeds)))
            count = sum(int(self.reference[f"nll/{i}"].size) for i in range(len(self.feeds)))
            return {"perplexity": math.exp(nll / count), "top1": 1.0}
        return _sentence_metrics(self, np.asarray(self.reference["embeddings"]))


def _in_order(batches: Sequence[npt.NDArray[np.float32]], rows: Sequence[npt.NDArray[np.int64]]
              ) -> npt.NDArray[np.float32]:
    """Per-batch embeddings put back in slice order."""
    out = np.zeros((sum(len(r) for r in rows), batches[0].shape[-1]), dtype=np.float32)
    for emb, index in zip(batches, rows, strict=True):
        out[index] = emb
    return out


def _sentence_metrics(scorer: SliceScorer, emb: npt.NDArray[Any]) -> dict[str, float]:
    from builder.evaluate.metrics import row_cosine

    if not np.all(np.isfinite(emb)):
        return {"cosine": -1.0, "cosine-min": -1.0, "probe-drop": 100.0}
    ref = np.asarray(scorer.reference["embeddings"], dtype=np.float32)
    cosine = row_cosine(emb, ref)
    out = {"cosine": float(np.mean(cosine)), "cosine-min": float(np.min(cosine))}
    if scorer.probe is not None:
        labels = scorer.data.labels
        out["probe-drop"] = 100.0 * (scorer.probe.accuracy(ref, labels) - scorer.probe.accuracy(emb, labels))
    return out


def _language_metrics(scorer: SliceScorer, outputs: Sequence[Mapping[str, npt.NDArray[Any]]]) -> dict[str, float]:
    assert scorer.data.windows is not None
    nll_sum, count, equal = 0.0, 0, 0
    for index, (out, ids) in enumerate(zip(outputs, scorer.data.windows.ids, strict=True)):
        nll, top1 = nll_top1(out[scorer.fetch[0]][0], ids)
        if not np.all(np.isfinite(nll)):
            return {"perplexity": math.inf, "top1": 0.0}
        nll_sum += float(np.sum(nll))
        count += int(nll.size)
        equal += int(np.sum(top1 == scorer.reference[f"argmax/{index}"]))
    return {"perplexity": math.exp(nll_sum / count), "top1": equal / count}


def _feeds(encoder: TextEncoder, data: SearchSlice, batch_size: int, max_length: int
           ) -> tuple[list[Feeds], list[npt.NDArray[Any]], list[npt.NDArray[np.int64]]]:
    from builder.evaluate.runner import encoder_batches

    if data.windows is not None:
        feeds = [encoder.feed_from_ids(ids[None]) for ids in data.windows.ids]
        return feeds, [np.ones((1, data.windows.ids.shape[1]), dtype=np.int64) for _ in feeds], []
    batches = list(encoder_batches(encoder, data.texts, batch_size, max_length))
    return [b.feeds for _, b in batches], [b.mask for _, b in batches], [rows for rows, _ in batches]


def _reference_arrays(fp32: onnx.ModelProto, data: SearchSlice, batches: tuple[list[Feeds], list[npt.NDArray[Any]],
                      list[npt.NDArray[np.int64]]], fetch: Sequence[str], pooling: Pooling | None
                      ) -> dict[str, npt.NDArray[Any]]:
    runner = OrtRunner(fp32)
    feeds, masks, rows = batches
    arrays: dict[str, npt.NDArray[Any]] = {}
    if data.windows is not None:
        for index, (feed, ids) in enumerate(zip(feeds, data.windows.ids, strict=True)):
            nll, top1 = nll_top1(runner.run(feed, list(fetch))[0][0], ids)
            arrays[f"nll/{index}"], arrays[f"argmax/{index}"] = nll, top1
        return arrays
    assert pooling is not None
    arrays["embeddings"] = _in_order([pooling.apply(runner.run(f, [pooling.output])[0], m)
                                      for f, m in zip(feeds, masks, strict=True)], rows)
    return arrays


def _probe_embeddings(fp32: onnx.ModelProto, encoder: TextEncoder, data: SearchSlice, pooling: Pooling,
                      batch_size: int, max_length: int) -> npt.NDArray[np.float32]:
    from builder.evaluate.runner import embed_texts

    return embed_texts(OrtRunner(fp32), encoder, data.probe_texts, pooling, batch_size, max_length)


def model_kind(fp32: onnx.ModelProto, encoder: TextEncoder) -> ModelKind:
    """Whether the evaluation treats ``fp32`` as a causal language model or a sentence encoder."""
    from builder.evaluate.survey import survey

    found = survey(fp32, OrtRunner(fp32), encoder)
    if found.logits is not None:
        return ModelKind.LANGUAGE
    if found.pooling is not None:
        return ModelKind.SENTENCE
    reasons = "; ".join(f"{s.figure}: {s.reason}" for s in found.skipped)
    raise ConfigError(f"the evaluation computes no budget metric for this model ({reasons}); the search needs a "
                      "sentence encoder or a causal language model")


def prepare_scorer(fp32: onnx.ModelProto, encoder: TextEncoder, data: SearchSlice, *,
                   with_probe: bool = False, batch_size: int = 32, max_length: int = 128,
                   cache_dir: Path | None = None, model_sha256: str | None = None) -> SliceScorer:
    """Feeds, fetched outputs and the FP32 reference of ``data`` (read from / written to ``cache_dir``)."""
    from builder.evaluate.refcache import cache_key, load_cached, save_cached, texts_hash
    from builder.evaluate.survey import survey
    from builder.evaluate.tokenizer import model_sha256 as sha_of

    found = survey(fp32, OrtRunner(fp32), encoder)
    if data.kind == ModelKind.LANGUAGE:
        if found.logits is None:
            raise ConfigError("this model has no causal-LM logits output, so it has no language-model metrics")
        fetch, pooling = (found.logits,), None
    else:
        if found.pooling is None:
            raise ConfigError("this model has no sentence embedding (no pooled output and no [batch, seq, hidden] "
                              "output to pool), so it has no sentence-encoder metrics")
        fetch, pooling = (found.pooling.output,), found.pooling
    feeds, masks, rows = batches = _feeds(encoder, data, batch_size, max_length)
    inputs = texts_hash(list(data.texts), None if data.windows is None else data.windows.ids.tolist(),
                        list(data.probe_texts) if with_probe else None)
    key = cache_key(purpose=PURPOSE, model=model_sha256 or sha_of(fp32), inputs=inputs, fetch=list(fetch),
                    pooling=repr(pooling), batch=batch_size, length=max_length, feeds=list(encoder.inputs.role_map()))
    arrays = load_cached(cache_dir, key)
    if arrays is None:
        computed = _reference_arrays(fp32, data, batches, fetch, pooling)
        if with_probe:
            assert pooling is not None
            computed["probe"] = _probe_embeddings(fp32, encoder, data, pooling, batch_size, max_length)
        save_cached(cache_dir, key, computed)
        arrays = computed
    probe = None
    if with_probe:
        from builder.evaluate.metrics import fit_probe

        probe = fit_probe(np.asarray(arrays["probe"], dtype=np.float32), data.probe_labels)
    reference = {k: np.asarray(arrays[k]) for k in arrays if k != "probe"}
    return SliceScorer(data=data, feeds=tuple(feeds), masks=tuple(masks), rows=tuple(rows), fetch=fetch,
                       pooling=pooling, reference=reference, probe=probe)
