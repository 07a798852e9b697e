"""Calibration stage: which graph input carries which text role, the KV-cache inputs, the embedding table.

Text roles are ours: ``tokens`` (token ids), ``mask`` (attention mask), ``token_types`` (segment ids) and
``positions`` (position ids). They map onto the model's input names, inferred from the usual names
(``input_ids``, ``attention_mask``, ``token_type_ids``, ``position_ids`` and common variants) or given
explicitly (``--input-map tokens=ids,mask=am``). Decoder graphs also take a KV cache: inputs named
``past_key_values.{i}.key`` / ``.value`` (or ``past.{i}.key``, ``past_key.{i}``, ``past_value.{i}``) of shape
``[batch, kv_heads, past, head_dim]``, fed empty (past length 0) for full-sequence runs.

The embedding table is the initializer read by the Gather whose indices are the token ids (through casts,
reshapes and weight-only dequantization); its row count bounds the token ids the model accepts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from calib.errors import ConfigError, GraphError, suggest

ROLES = ("tokens", "mask", "token_types", "positions")
ROLE_NAMES: Mapping[str, tuple[str, ...]] = {
    "tokens": ("input_ids", "ids", "input", "inputs", "tokens", "token_ids", "input_tokens"),
    "mask": ("attention_mask", "mask", "input_mask", "attn_mask"),
    "token_types": ("token_type_ids", "segment_ids", "input_type_ids", "type_ids"),
    "positions": ("position_ids", "positions", "pos_ids"),
}
INPUT_MAP_FLAG = "--input-map"
_CACHE_PATTERNS = (
    re.compile(r"^past_key_values[._](?P<layer>\d+)[._](?P<kind>key|value)$"),
    re.compile(r"^past[._](?P<layer>\d+)[._](?P<kind>key|value)$"),
    re.compile(r"^past_(?P<kind>key|value)[._](?P<layer>\d+)$"),
)
_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
_WEIGHT_CHAIN = frozenset({"DequantizeLinear", "Cast", "Mul", "Identity"})


@dataclass(frozen=True, kw_only=True)
class CacheInput:
    """One KV-cache input: layer index, "key" or "value", dtype and its dims (``None`` on the past axis)."""

    name: str
    layer: int
    kind: str
    dtype: np.dtype[Any]
    dims: tuple[int | None, ...]  # static dims; None for batch (axis 0) and the past axis
    past_axis: int


@dataclass(frozen=True, kw_only=True)
class ModelInputs:
    """The model's inputs by role; ``dtypes`` holds the NumPy dtype of every non-cache input."""

    tokens: str
    mask: str | None
    token_types: str | None
    positions: str | None
    cache: tuple[CacheInput, ...]
    dtypes: Mapping[str, np.dtype[Any]]

    def role_map(self) -> dict[str, str]:
        """``{role: input name}`` for the roles the model has."""
        names = {"tokens": self.tokens, "mask": self.mask, "token_types": self.token_types,
                 "positions": self.positions}
        return {role: name for role, name in names.items() if name is not None}


def parse_input_map(items: Sequence[str] | str | Mapping[str, str] | None) -> dict[str, str]:
    """``{role: input}`` from ``"tokens=ids,mask=am"``, a list of ``role=name`` items, or a mapping."""
    if items is None:
        return {}
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        parts = items.split(",") if isinstance(items, str) else [p for item in items for p in item.split(",")]
        pairs = []
        for part in (p.strip() for p in parts):
            if not part:
                continue
            role, sep, name = part.partition("=")
            if not sep or not role.strip() or not name.strip():
                raise ConfigError(f"{INPUT_MAP_FLAG} {part!r}: expected ROLE=INPUT, e.g. tokens=input_ids")
            pairs.append((role.strip(), name.strip()))
    result: dict[str, str] = {}
    for role, name in pairs:
        if role not in ROLES:
            raise ConfigError(f"{INPUT_MAP_FLAG}: unknown role {role!r}; roles are {', '.join(ROLES)}"
                              f"{suggest(role, ROLES)}")
        if role in result:
            raise ConfigError(f"{INPUT_MAP_FLAG}: role {role!r} given twice")
        result[role] = name
    return result


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real graph inputs (initializers listed as inputs by old exporters are left out)."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _np_dtype(info: onnx.ValueInfoProto) -> np.dtype[Any]:
    elem = info.type.tensor_type.elem_type
    if elem == onnx.TensorProto.UNDEFINED:
        raise GraphError(f"input {info.name!r} is not a tensor with a known element type")
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


def _cache_input(info: onnx.ValueInfoProto) -> CacheInput | None:
    for pattern in _CACHE_PATTERNS:
        match = pattern.match(info.name)
        if match is None:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
        dynamic = [axis for axis, d in enumerate(dims) if d is None and axis != 0]
        if len(dims) != 4 or len(dynamic) != 1:
            raise GraphError(
                f"KV-cache input {info.name!r} has dims {dims}; expected [batch, kv_heads, past, head_dim] with "
                "only batch and past dynamic"
            )
        return CacheInput(name=info.name, layer=int(match.group("layer")), kind=match.group("kind"),
                          dtype=_np_dtype(info), dims=tuple(dims), past_axis=dynamic[0])
    return None


def _infer_role(role: str, free: Sequence[str], dtypes: Mapping[str, np.dtype[Any]]) -> str | None:
    lowered = {name.lower(): name for name in free}
    for candidate in ROLE_NAMES[role]:
        if candidate in lowered:
            return lowered[candidate]
    if role == "tokens":
        integer = [n for n in free if np.issubdtype(dtypes[n], np.integer)]
        if len(integer) == 1:
            return integer[0]
    return None


def model_inputs(model: onnx.ModelProto, input_map: Mapping[str, str] | None = None) -> ModelInputs:
    """Map the model's inputs onto the text roles (explicit ``input_map`` first, then the usual names).

    Raises ConfigError for a mapped name the model lacks, and for any model input no role covers.
    """
    infos = graph_inputs(model)
    cache = tuple(c for c in (_cache_input(i) for i in infos) if c is not None)
    cache_names = {c.name for c in cache}
    dtypes = {i.name: _np_dtype(i) for i in infos if i.name not in cache_names}
    explicit = dict(input_map or {})
    for role, name in explicit.items():
        if name not in dtypes:
            raise ConfigError(f"{INPUT_MAP_FLAG} {role}={name}: the model has no input {name!r}; its inputs are "
                              f"{', '.join(sorted(dtypes))}{suggest(name, dtypes)}")
    roles: dict[str, str | None] = {}
    for role in ROLES:
        if role in explicit:
            roles[role] = explicit[role]
            continue
        taken = set(explicit.values()) | {v for v in roles.values() if v}
        roles[role] = _infer_role(role, [n for n in dtypes if n not in taken], dtypes)
    tokens = roles["tokens"]
    if tokens is None:
        raise ConfigError(f"cannot tell which input takes the token ids (inputs: {', '.join(sorted(dtypes))}); "
                          f"pass {INPUT_MAP_FLAG} tokens=NAME")
    unmapped = sorted(set(dtypes) - {v for v in roles.values() if v})
    if unmapped:
        raise ConfigError(
            f"the model input {unmapped[0]!r} has no text role; map it with {INPUT_MAP_FLAG} ROLE={unmapped[0]} "
            f"(roles: {', '.join(ROLES)})"
        )
    return ModelInputs(tokens=tokens, mask=roles["mask"], token_types=roles["token_types"],
                       positions=roles["positions"], cache=tuple(sorted(cache, key=lambda c: (c.layer, c.kind))),
                       dtypes=dtypes)


def _constant_dims(inits: Mapping[str, onnx.TensorProto], producers: Mapping[str, onnx.NodeProto], tensor: str,
                   depth: int = 0) -> tuple[int, ...] | None:
    """Dims of the initializer or Constant ``tensor`` reached through weight-only dequantization chains
    (``DequantizeLinear(int8)``, ``Cast(int8) -> Mul(scale)``); the widest operand of a Mul is the weight."""
    if tensor in inits:
        return tuple(int(d) for d in inits[tensor].dims)
    node = producers.get(tensor)
    if node is None or depth > 8:  # the chains are short; the cap guards against cycles
        return None
    if node.op_type == "Constant":
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        return None if value is None else tuple(int(d) for d in value.dims)
    if node.op_type not in _WEIGHT_CHAIN:
        return None
    operands = node.input[:2] if node.op_type == "Mul" else node.input[:1]
    found = [d for d in (_constant_dims(inits, producers, t, depth + 1) for t in operands) if d is not None]
    return max(found, key=len) if found else None


def embedding_rows(model: onnx.ModelProto, tokens: str) -> int | None:
    """Row count of the embedding table gathered with the token ids ``tokens`` (None when not found)."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier, seen = [tokens], set()
    while frontier:
        tensor = frontier.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        for node in consumers.get(tensor, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                dims = _constant_dims(inits, producers, node.input[0])
                axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
                if dims is not None and len(dims) == 2:
                    return dims[axis]
            elif node.op_type in _PASS_THROUGH and node.input[0] == tensor:
                frontier.extend(o for o in node.output if o)
    return None
