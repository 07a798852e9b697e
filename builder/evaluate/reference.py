"""Evaluation stage: the FP32 reference -- computed once per (model, data, settings), cached on disk.

:func:`prepare_reference` surveys the FP32 model (:mod:`builder.evaluate.survey`), then either reads its
outputs on the held-out data from the cache (:mod:`builder.evaluate.refcache`) or computes and writes them:
sentence embeddings for the probe and Lee pairs, every compared output on the comparison sentences (encoders)
or on the perplexity windows (language models), and greedy generations with their cached-path check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnx

from builder.evaluate.decoder import GreedyRun, check_runs, greedy
from builder.evaluate.language import Windows, lm_windows, reference_windows
from builder.evaluate.metrics import Probe
from builder.evaluate.progress import Phases, Progress
from builder.evaluate.refcache import cache_key, load_cached, save_cached, texts_hash
from builder.evaluate.report import CacheCheck
from builder.evaluate.runner import OrtRunner, encoder_batches
from builder.evaluate.sentence import SentenceReference, embed_all, sentence_reference
from builder.evaluate.survey import Survey, survey
from calib.errors import ConfigError
from calib.text_encoder import TextEncoder

if TYPE_CHECKING:
    from builder.evaluate.evaluate import EvalData

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Reference:
    """Everything the FP32 side contributes to every evaluation against it."""

    survey: Survey
    encoder: TextEncoder
    arrays: Mapping[str, npt.NDArray[Any]]
    sentence: SentenceReference | None = None
    windows: Windows | None = None
    generation: tuple[tuple[int, ...], ...] = ()  # FP32 greedy tokens per prompt
    cache_check: CacheCheck | None = None
    cache_file: Path | None = None
    reused: bool = False
    comparison_batches: int = 0
    notes: tuple[str, ...] = field(default=())

    def _sentence(self) -> SentenceReference:
        if self.sentence is None:
            raise ConfigError("this reference has no sentence-encoder figures (the model has no embedding)")
        return self.sentence

    # views kept for version-1 callers
    @property
    def probe(self) -> Probe:
        return self._sentence().probe

    @property
    def probe_accuracy(self) -> float:
        return self._sentence().probe_accuracy

    @property
    def spearman(self) -> float | None:
        return self._sentence().spearman

    @property
    def test(self) -> npt.NDArray[np.float32]:
        return self._sentence().test

    @property
    def train(self) -> npt.NDArray[np.float32] | None:
        return self._sentence().train


def _tokenizer_digest(encoder: TextEncoder) -> str:
    from calib.artifact_io import sha256_file

    path = encoder.info.tokenizer.path
    if path.is_file():
        return sha256_file(path)
    files = sorted(p for p in path.iterdir() if p.is_file())
    return texts_hash([(p.name, sha256_file(p)) for p in files])


def _key(model_sha: str, encoder: TextEncoder, found: Survey, data: EvalData, windows: Windows | None) -> str:
    lm = None if windows is None else (texts_hash(windows.ids.tolist()), data.prompts, data.new_tokens)
    sentence = texts_hash(data.train_texts, data.train_labels, data.test_texts, data.test_labels,
                          data.pair_docs, data.pairs, data.layer_texts)
    return cache_key(model=model_sha, tokenizer=_tokenizer_digest(encoder), inputs=encoder.inputs.role_map(),
                     outputs=[o.name for o in found.outputs], pooling=repr(found.pooling), logits=found.logits,
                     sentence=sentence if windows is None else None, lm=lm, batch=data.batch_size,
                     length=data.max_length)


def comparison_feeds(encoder: TextEncoder, data: EvalData) -> list[tuple[dict[str, npt.NDArray[Any]],
                                                                          npt.NDArray[np.int64]]]:
    """The encoder-side comparison batches: the per-layer sentences in length order, with their masks."""
    return [(b.feeds, b.mask) for _, b in encoder_batches(encoder, data.layer_texts, data.batch_size,
                                                          data.max_length)]


def _compute_outputs(runner: OrtRunner, found: Survey, encoder: TextEncoder, data: EvalData,
                     arrays: dict[str, npt.NDArray[Any]], progress: Phases) -> None:
    names = [o.name for o in found.outputs]
    feeds = comparison_feeds(encoder, data)
    with progress.phase(f"FP32 reference: outputs on {len(data.layer_texts)} comparison sentences",
                        total=len(feeds)) as step:
        for index, (feed, mask) in enumerate(feeds):
            for name, value in zip(names, runner.run(feed, names), strict=True):
                arrays[f"out/{name}/{index}"] = np.asarray(value, dtype=np.float32)
            arrays[f"mask/{index}"] = mask
            step(1)


def generate_all(runner: OrtRunner, found: Survey, encoder: TextEncoder, prompts: Sequence[str],
                 new_tokens: int, progress: Phases, who: str) -> tuple[list[GreedyRun], CacheCheck]:
    """Greedy runs for every prompt and their cached-vs-full check."""
    assert found.logits is not None
    with progress.phase(f"{who}: greedy generation, {len(prompts)} prompts x {new_tokens} tokens",
                        total=len(prompts), unit="prompt") as step:
        runs = []
        for prompt in prompts:
            runs.append(greedy(runner, encoder, found.logits, found.present, encoder.prompt_ids(prompt), new_tokens))
            step(1)
    with progress.phase(f"{who}: cached-path check", total=None):
        check = check_runs(runner, encoder, found.logits, runs)
    return runs, check


def _compute(runner: OrtRunner, found: Survey, encoder: TextEncoder, data: EvalData, windows: Windows | None,
             progress: Phases) -> dict[str, npt.NDArray[Any]]:
    arrays: dict[str, npt.NDArray[Any]] = {}
    if windows is not None:
        with progress.phase(f"FP32 reference: {len(windows.ids)} perplexity windows of {windows.ids.shape[1]} "
                            "tokens", total=len(windows.ids), unit="window") as step:
            reference_windows(runner, found, encoder, windows, arrays, step)
        if found.present and data.prompts:
            runs, check = generate_all(runner, found, encoder, data.prompts, data.new_tokens, progress, "FP32")
            for index, run in enumerate(runs):
                arrays[f"gen/{index}"] = np.asarray(run.tokens, dtype=np.int64)
            arrays["gen/check"] = np.asarray([check.positions, check.max_abs_diff, check.max_abs_logit,
                                              float(check.argmax_equal)], dtype=np.float64)
    else:
        _compute_outputs(runner, found, encoder, data, arrays, progress)
    if found.pooling is not None:
        emb = embed_all(runner, encoder, found.pooling, data, True, progress, "FP32 reference")
        arrays.update({f"sent/{k}": v for k, v in emb.items()})
    return arrays


def _stored_check(arrays: Mapping[str, npt.NDArray[Any]]) -> CacheCheck | None:
    if "gen/check" not in arrays:
        return None
    positions, diff, scale, argmax_equal = (float(v) for v in arrays["gen/check"])
    from builder.evaluate.decoder import CACHE_RTOL

    tolerance = CACHE_RTOL * max(1.0, scale)
    return CacheCheck(positions=int(positions), max_abs_diff=diff, max_abs_logit=scale, tolerance=tolerance,
                      within=diff <= tolerance, argmax_equal=bool(argmax_equal))


def prepare_reference(
    fp32_model: onnx.ModelProto,
    data: EvalData,
    *,
    encoder: TextEncoder | None = None,
    cache_dir: Path | None = None,
    model_sha256: str | None = None,
    progress: Phases | None = None,
) -> Reference:
    """Survey the FP32 model and compute (or read from ``cache_dir``) its outputs on ``data``."""
    from builder.evaluate.tokenizer import model_sha256 as sha_of
    from builder.evaluate.tokenizer import model_text_encoder

    progress = progress or Progress()
    enc = encoder or model_text_encoder(fp32_model, data.tokenizer_json)
    runner = OrtRunner(fp32_model)
    found = survey(fp32_model, runner, enc, data.outputs or None)
    windows = None
    if found.logits is not None:
        from calib.data import corpus_split

        windows = lm_windows(enc, corpus_split(data.text_source), data.window, data.windows)
    key = _key(model_sha256 or sha_of(fp32_model), enc, found, data, windows)
    cached = load_cached(cache_dir, key)
    arrays: Mapping[str, npt.NDArray[Any]] = cached if cached is not None else _compute(
        runner, found, enc, data, windows, progress)
    path = None
    if cached is None:
        path = save_cached(cache_dir, key, arrays)
    else:
        from builder.evaluate.refcache import cache_path

        path = cache_path(cache_dir, key) if cache_dir is not None else None
    sentence = sentence_reference(arrays, found.pooling, data) if found.pooling is not None else None
    generation = tuple(tuple(int(t) for t in arrays[f"gen/{i}"]) for i in range(len(data.prompts))
                       if f"gen/{i}" in arrays)
    return Reference(survey=found, encoder=enc, arrays=arrays, sentence=sentence, windows=windows,
                     generation=generation, cache_check=_stored_check(arrays), cache_file=path,
                     reused=cached is not None, comparison_batches=sum(1 for k in arrays if k.startswith("mask/")))
