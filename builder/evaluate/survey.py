"""Evaluation stage: what the FP32 model's outputs are, and so which figures apply (never by name alone).

One short probe run on two real sentences gives every output's actual shape. Then:

* compared outputs: every float output (or the ones the caller names), KV-cache outputs included;
* kinds: ``logits`` (name contains "logits"), ``embedding`` ([batch, features]), ``hidden`` ([batch, seq,
  hidden]), else ``tensor``;
* sentence embedding: an output named like one (``sentence_embedding``, ``embeddings``, ...) as it is;
  else the attention-masked mean of ``last_hidden_state`` (or of the only [batch, seq, hidden] output);
* language model: a [batch, seq, vocab] ``logits`` output that is causal -- changing the last token leaves
  the logits of every earlier position unchanged -- which rules out masked language models;
* generation through the KV cache: the model takes ``past_key_values`` inputs and returns a ``present``
  output for each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from builder.evaluate.report import Skipped
from builder.evaluate.runner import OrtRunner, Pooling
from calib.errors import ConfigError, suggest
from calib.text_encoder import TextEncoder

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})
POOLED_NAMES = ("sentence_embedding", "sentence_embeddings", "embeddings", "embedding", "text_embeds",
                "pooled_embedding", "sentence_embeds")
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog near the river bank.", "A short one.")
CAUSAL_RTOL = 1e-4  # earlier positions may move by this share of max |logit| (summation order) and stay causal
_PRESENT = re.compile(r"^present[._](?P<layer>\d+)[._](?P<kind>key|value)$|^present_(?P<kind2>key|value)[._]"
                      r"(?P<layer2>\d+)$")


@dataclass(frozen=True, kw_only=True)
class OutputInfo:
    """One float output: its kind and whether its leading axes are [batch, seq]."""

    name: str
    kind: str
    per_token: bool


@dataclass(frozen=True, kw_only=True)
class Survey:
    """Outputs to compare and the task figures that apply (with a reason for each that does not)."""

    outputs: tuple[OutputInfo, ...]
    pooling: Pooling | None
    logits: str | None  # the causal language-model output, if any
    present: dict[str, str]  # past input name -> present output name (generation through the KV cache)
    skipped: tuple[Skipped, ...]


def present_outputs(model: onnx.ModelProto, encoder: TextEncoder) -> dict[str, str]:
    """``{past input: present output}`` when every KV-cache input has its present output, else ``{}``."""
    found: dict[tuple[int, str], str] = {}
    for out in model.graph.output:
        match = _PRESENT.match(out.name)
        if match:
            layer = int(match.group("layer") or match.group("layer2"))
            found[(layer, match.group("kind") or match.group("kind2"))] = out.name
    pairs = {c.name: found.get((c.layer, c.kind)) for c in encoder.inputs.cache}
    if not pairs or any(v is None for v in pairs.values()):
        return {}
    return {k: v for k, v in pairs.items() if v is not None}


def _kind(name: str, shape: tuple[int, ...], per_token: bool, cache_out: bool) -> str:
    if "logits" in name.lower():
        return "logits"
    if len(shape) == 2 and not per_token and not cache_out:
        return "embedding"
    if per_token and len(shape) == 3 and not cache_out:
        return "hidden"
    return "tensor"


def _float_outputs(model: onnx.ModelProto, selected: Sequence[str] | None) -> list[str]:
    floats = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES]
    if not selected:
        if not floats:
            raise ConfigError("the model has no float output to compare")
        return floats
    names = [o.name for o in model.graph.output]
    for name in selected:
        if name not in names:
            raise ConfigError(f"--output {name}: the model has no output {name!r}; its outputs are "
                              f"{', '.join(names)}{suggest(name, names)}")
        if name not in floats:
            raise ConfigError(f"--output {name}: not a float output; float outputs: {', '.join(floats)}")
    return list(dict.fromkeys(selected))


def _pooling(infos: Sequence[OutputInfo]) -> Pooling | None:
    for info in infos:
        if info.kind == "embedding" and info.name.lower() in POOLED_NAMES:
            return Pooling(output=info.name, mean=False)
    hidden = [i for i in infos if i.kind == "hidden"]
    named = [i for i in hidden if i.name == "last_hidden_state"]
    if named or len(hidden) == 1:
        return Pooling(output=(named or hidden)[0].name, mean=True)
    return None


def _is_causal(runner: OrtRunner, encoder: TextEncoder, logits: str) -> bool:
    ids = np.asarray([encoder.token_ids(PROBE_TEXTS[0])[:12]], dtype=np.int64)
    if ids.shape[1] < 3:
        return False
    changed = ids.copy()
    rows = encoder.info.embedding_rows or (encoder.info.largest_id + 1)
    changed[0, -1] = (changed[0, -1] + 1) % rows
    (a,) = runner.run(encoder.feed_from_ids(ids), [logits])
    (b,) = runner.run(encoder.feed_from_ids(changed), [logits])
    scale = max(1.0, float(np.max(np.abs(a))))
    return bool(np.max(np.abs(a[:, :-1] - b[:, :-1])) <= CAUSAL_RTOL * scale)


def survey(model: onnx.ModelProto, runner: OrtRunner, encoder: TextEncoder,
           selected: Sequence[str] | None = None) -> Survey:
    """Probe the FP32 model once and decide what to compare and which task figures apply."""
    all_floats = _float_outputs(model, None)
    compared = _float_outputs(model, selected)
    batch = encoder.encode(list(PROBE_TEXTS), max_length=32)
    values = runner.run(batch.feeds, all_floats)
    present = present_outputs(model, encoder)
    cache_outs = set(present.values()) | {o for o in all_floats if _PRESENT.match(o)}
    infos = []
    for name, value in zip(all_floats, values, strict=True):
        per_token = value.ndim >= 2 and value.shape[:2] == batch.mask.shape and name not in cache_outs
        infos.append(OutputInfo(name=name, kind=_kind(name, value.shape, per_token, name in cache_outs),
                                per_token=per_token))
    skipped: list[Skipped] = []
    logits = next((i.name for i in infos if i.kind == "logits" and i.per_token), None)
    if logits is None:
        skipped.append(Skipped(figure="perplexity", reason="no [batch, seq, vocab] output named 'logits'"))
    elif not _is_causal(runner, encoder, logits):
        skipped.append(Skipped(figure="perplexity", reason=f"output {logits!r} is not causal (changing the last "
                                                           "token moves earlier positions): a masked LM"))
        logits = None
    if logits is not None and not present:
        skipped.append(Skipped(figure="generation", reason="no past_key_values inputs with matching present "
                                                           "outputs: greedy generation needs the KV-cache graph"))
    pooling = None if logits is not None else _pooling(infos)
    if pooling is None:
        reason = ("a causal language model" if logits is not None else
                  "no pooled embedding output and no single [batch, seq, hidden] output to pool")
        skipped.append(Skipped(figure="sentence", reason=reason))
    by_name = {i.name: i for i in infos}
    return Survey(outputs=tuple(by_name[n] for n in compared), pooling=pooling, logits=logits,
                  present=present if logits is not None else {}, skipped=tuple(skipped))
