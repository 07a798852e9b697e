"""Model intake stage: the KV-cache interface of a decoder ONNX graph, ours or one a user brings.

A decoder graph is accepted when its inputs and outputs follow the deployed form (see
:mod:`builder.intake.decoder`): ``input_ids``, ``attention_mask``, optionally ``position_ids``, for every
layer ``i`` a past key and value input and a present key and value output, and a ``logits`` output. Cache
tensor names follow one of the common conventions::

    past_key_values.{i}.key / .value    ->  present.{i}.key / .value       (Hugging Face Optimum, ours)
    past.{i}.key / .value               ->  present.{i}.key / .value
    past_key_{i} / past_value_{i}       ->  present_key_{i} / present_value_{i}

The cache layout must be ``[batch, kv_heads, past, head_dim]`` (the heads and head size read from the
graph's declared input shapes when they are static). Anything else is a GraphError naming what is missing.
"""

from __future__ import annotations

import re

import onnx

from calib.errors import GraphError
from calib.schema import Schema

_PAST = (re.compile(r"^past_key_values\.(\d+)\.(key|value)$"), re.compile(r"^past\.(\d+)\.(key|value)$"),
         re.compile(r"^past_(key|value)_(\d+)$"))
_PRESENT = (re.compile(r"^present\.(\d+)\.(key|value)$"), re.compile(r"^present_(key|value)_(\d+)$"),
            re.compile(r"^present_key_values\.(\d+)\.(key|value)$"))
_CACHE_RANK = 4


class CacheTensors(Schema, frozen=True, kw_only=True):
    """The past inputs and present outputs of one layer."""

    layer: int
    past_key: str
    past_value: str
    present_key: str
    present_value: str


class DecoderIO(Schema, frozen=True, kw_only=True):
    """Names and cache geometry of a KV-cache decoder graph."""

    input_ids: str
    attention_mask: str
    position_ids: str | None
    logits: str
    cache: tuple[CacheTensors, ...]  # one per layer, in layer order
    num_kv_heads: int | None  # static cache dimension 1, when declared
    head_dim: int | None  # static cache dimension 3, when declared

    @property
    def num_layers(self) -> int:
        return len(self.cache)


def _match(name: str, patterns: tuple[re.Pattern[str], ...]) -> tuple[int, str] | None:
    for pattern in patterns:
        m = pattern.match(name)
        if m is not None:
            a, b = m.groups()
            return (int(a), b) if a.isdigit() else (int(b), a)
    return None


def _collect(names: list[str], patterns: tuple[re.Pattern[str], ...]) -> dict[tuple[int, str], str]:
    return {key: name for name in names if (key := _match(name, patterns)) is not None}


def decoder_io(model: onnx.ModelProto, where: str = "model") -> DecoderIO:
    """The KV-cache interface of ``model``; GraphError naming the missing input or output otherwise."""
    inputs = {i.name: i for i in model.graph.input}
    initializers = {t.name for t in model.graph.initializer}
    input_names = [n for n in inputs if n not in initializers]
    output_names = [o.name for o in model.graph.output]
    for needed in ("input_ids", "attention_mask"):
        if needed not in inputs:
            raise GraphError(f"{where} is not a KV-cache decoder graph: it has no input {needed!r} "
                             f"(inputs: {', '.join(input_names)})")
    if "logits" not in output_names:
        raise GraphError(f"{where} is not a KV-cache decoder graph: it has no output 'logits' "
                         f"(outputs: {', '.join(output_names)})")
    past, present = _collect(input_names, _PAST), _collect(output_names, _PRESENT)
    if not past:
        raise GraphError(f"{where} has no past key/value inputs (expected past_key_values.{{i}}.key / .value); "
                         "export it with a KV cache (builder.intake.decoder.export_causal_lm)")
    layers = 1 + max(layer for layer, _ in past)
    cache = []
    for layer in range(layers):
        missing = [f"{kind} {part}" for kind, found in (("past", past), ("present", present))
                   for part in ("key", "value") if (layer, part) not in found]
        if missing:
            raise GraphError(f"{where}: layer {layer} of {layers} lacks its {', '.join(missing)} tensor(s); "
                             "every layer needs past key/value inputs and present key/value outputs")
        cache.append(CacheTensors(layer=layer, past_key=past[layer, "key"], past_value=past[layer, "value"],
                                  present_key=present[layer, "key"], present_value=present[layer, "value"]))
    heads, head_dim = _cache_geometry(inputs[cache[0].past_key], where)
    return DecoderIO(input_ids="input_ids", attention_mask="attention_mask",
                     position_ids="position_ids" if "position_ids" in inputs else None, logits="logits",
                     cache=tuple(cache), num_kv_heads=heads, head_dim=head_dim)


def _cache_geometry(value: onnx.ValueInfoProto, where: str) -> tuple[int | None, int | None]:
    dims = value.type.tensor_type.shape.dim
    if value.type.tensor_type.HasField("shape") and len(dims) != _CACHE_RANK:
        raise GraphError(f"{where}: cache input {value.name!r} has rank {len(dims)}; expected 4 "
                         "([batch, kv_heads, past, head_dim])")
    if len(dims) != _CACHE_RANK:
        return None, None
    heads, head_dim = dims[1], dims[3]
    return (heads.dim_value if heads.HasField("dim_value") else None,
            head_dim.dim_value if head_dim.HasField("dim_value") else None)
