"""Evaluation stage: greedy generation through a decoder's KV-cache graph, and the cached-path check.

The graph takes ``input_ids``, ``attention_mask`` [batch, past + seq], ``position_ids`` and
``past_key_values.{i}.key/value`` [batch, kv_heads, past, head_dim]; it returns ``logits`` and
``present.{i}.key/value``. Generation (batch 1, greedy):

    prefill:  ids = prompt (P tokens), past empty        -> logits[0..P-1], present (past = P)
    decode:   ids = [next], mask ones [1, past + 1],
              position = past, past = present           -> logits[past], present (past + 1)

The check runs prompt + generated tokens (all but the last) through one full-sequence call with an empty
past and compares its logits with the cached path's at every position: they must agree within
``CACHE_RTOL x max(1, max |logit|)``, and so must every argmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from builder.evaluate.report import CacheCheck
from builder.evaluate.runner import OrtRunner
from calib.errors import ConfigError, GraphError
from calib.text_encoder import TextEncoder

CACHE_RTOL = 1e-3  # stated tolerance of the cached-vs-full check, relative to max(1, max |logit|)


@dataclass(frozen=True, kw_only=True)
class GreedyRun:
    """Greedy continuation: generated token ids and the logits of every position the cached path computed."""

    prompt_ids: tuple[int, ...]
    tokens: tuple[int, ...]
    logits: npt.NDArray[np.float32]  # [prompt + generated - 1, vocab]


def greedy(runner: OrtRunner, encoder: TextEncoder, logits_name: str, present: Mapping[str, str],
           prompt_ids: Sequence[int], new_tokens: int) -> GreedyRun:
    """Generate ``new_tokens`` greedily from ``prompt_ids`` through the KV cache (prefill, then one at a time)."""
    if not prompt_ids:
        raise ConfigError("a generation prompt encodes to no tokens")
    if new_tokens < 1:
        raise ConfigError(f"new tokens {new_tokens} must be at least 1")
    past_names = list(present)
    outputs = [logits_name, *present.values()]
    values = runner.run(encoder.feed_from_ids(np.asarray([list(prompt_ids)], dtype=np.int64)), outputs)
    rows = [np.asarray(values[0][0], dtype=np.float32)]
    caches = dict(zip(past_names, values[1:], strict=True))
    tokens = [int(np.argmax(rows[-1][-1]))]
    roles = encoder.inputs
    for _ in range(new_tokens - 1):
        past = len(prompt_ids) + len(tokens) - 1
        feeds = encoder.feed_from_ids(np.asarray([[tokens[-1]]], dtype=np.int64))
        if roles.mask is not None:
            feeds[roles.mask] = np.ones((1, past + 1), dtype=roles.dtypes[roles.mask])
        if roles.positions is not None:
            feeds[roles.positions] = np.asarray([[past]], dtype=roles.dtypes[roles.positions])
        feeds.update(caches)
        values = runner.run(feeds, outputs)
        rows.append(np.asarray(values[0][0], dtype=np.float32))
        caches = dict(zip(past_names, values[1:], strict=True))
        tokens.append(int(np.argmax(rows[-1][-1])))
    logits = np.concatenate(rows, axis=0)
    if not np.all(np.isfinite(logits)):
        raise GraphError("the model produced non-finite logits during generation")
    return GreedyRun(prompt_ids=tuple(int(i) for i in prompt_ids), tokens=tuple(tokens), logits=logits)


def full_sequence_logits(runner: OrtRunner, encoder: TextEncoder, logits_name: str,
                         ids: Sequence[int]) -> npt.NDArray[np.float32]:
    """Logits ``[len(ids), vocab]`` of one full-sequence run (empty past)."""
    (values,) = runner.run(encoder.feed_from_ids(np.asarray([list(ids)], dtype=np.int64)), [logits_name])
    return np.asarray(values[0], dtype=np.float32)


def cache_check(runs: Sequence[GreedyRun], full: Sequence[npt.NDArray[np.float32]]) -> CacheCheck:
    """Cached-path logits of ``runs`` against their full-sequence logits ``full`` (same order)."""
    diffs, scale, argmax_equal, positions = 0.0, 0.0, True, 0
    for run, ref in zip(runs, full, strict=True):
        if run.logits.shape != ref.shape:
            raise GraphError(f"cached path gave logits {run.logits.shape}, the full sequence {ref.shape}")
        diffs = max(diffs, float(np.max(np.abs(run.logits - ref))))
        scale = max(scale, float(np.max(np.abs(ref))))
        argmax_equal &= bool(np.array_equal(np.argmax(run.logits, axis=-1), np.argmax(ref, axis=-1)))
        positions += int(ref.shape[0])
    tolerance = CACHE_RTOL * max(1.0, scale)
    return CacheCheck(positions=positions, max_abs_diff=diffs, max_abs_logit=scale, tolerance=tolerance,
                      within=diffs <= tolerance, argmax_equal=argmax_equal)


def check_runs(runner: OrtRunner, encoder: TextEncoder, logits_name: str, runs: Sequence[GreedyRun]) -> CacheCheck:
    """Run every generated sequence once in full and compare (see :func:`cache_check`)."""
    full = [full_sequence_logits(runner, encoder, logits_name, [*r.prompt_ids, *r.tokens[:-1]]) for r in runs]
    return cache_check(runs, full)


def leading_agreement(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """How many leading tokens equal the reference's."""
    count = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        count += 1
    return count
