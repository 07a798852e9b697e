"""Engine-build stage: which profile dimension each dynamic input axis is (batch, sequence, cache length).

An optimization profile gives every dynamic input dimension a min/opt/max. The CLI names three ranges:
``--batch``, ``--seq`` (new tokens) and ``--past`` (KV-cache length of a decoder). Each dynamic axis of each
graph input is assigned one of them, or ``total`` = past + seq for an attention mask that covers the cache
and the new tokens. Decoder graphs follow the names Hugging Face exports use::

    input_ids, position_ids [batch, seq]        attention_mask [batch, past + seq]
    past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]   (also past.{i}.key, past_key_{i})

A ``dim_param`` symbol shared between inputs gives them the same dimension (an exporter that names the mask's
second axis like ``input_ids``' gets ``seq`` there); any other input takes axis 0 as the batch and axis 1 as
the sequence. Anything else dynamic is refused with the axis named.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import onnx

from builder.backends.options import DimRange, ShapeProfile
from calib.errors import ConfigError

BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "total"
# the cache input conventions builder.intake.decoder_io accepts (Optimum / ours, and two older spellings)
PAST_INPUT = re.compile(r"^(past_key_values\.\d+\.(key|value)|past\.\d+\.(key|value)|past_(key|value)_\d+)$")
TOKEN_INPUTS = ("input_ids", "position_ids", "token_type_ids")

Roles = Mapping[str, tuple[str | None, ...]]  # input name -> per axis: its dimension, None when static


def _symbols(value: onnx.ValueInfoProto) -> list[str | None]:
    """Per axis: the dim_param symbol of a dynamic axis, "" for an unnamed dynamic one, None when static."""
    out: list[str | None] = []
    for d in value.type.tensor_type.shape.dim:
        out.append(None if d.HasField("dim_value") and d.dim_value > 0 else d.dim_param)
    return out


def _conventional(name: str, axis: int, has_past: bool) -> str | None:
    if PAST_INPUT.match(name):
        return {0: BATCH, 2: PAST}.get(axis)
    if name == "attention_mask":
        return {0: BATCH, 1: TOTAL if has_past else SEQ}.get(axis)
    if name in TOKEN_INPUTS:
        return {0: BATCH, 1: SEQ}.get(axis)
    return None


def input_dim_roles(model: onnx.ModelProto) -> dict[str, tuple[str | None, ...]]:
    """For every graph input (initializers excluded): the profile dimension of each axis (None: static or
    unknown dynamic; :func:`profile_shapes` refuses an unknown dynamic axis by name)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    has_past = any(PAST_INPUT.match(v.name) for v in inputs)
    learned: dict[str, str] = {}  # dim_param symbol -> dimension, from the conventionally named inputs
    for value in inputs:
        for axis, symbol in enumerate(_symbols(value)):
            role = _conventional(value.name, axis, has_past)
            if symbol and role is not None and role != TOTAL:
                learned.setdefault(symbol, role)
    roles: dict[str, tuple[str | None, ...]] = {}
    for value in inputs:
        axes: list[str | None] = []
        for axis, symbol in enumerate(_symbols(value)):
            if symbol is None:
                axes.append(None)
                continue
            role = learned.get(symbol) if symbol else None
            if role is None:
                role = _conventional(value.name, axis, has_past)
            if role is None and not PAST_INPUT.match(value.name) and axis < 2:
                role = (BATCH, SEQ)[axis]
            axes.append(role)
        roles[value.name] = tuple(axes)
    return roles


def needs_past(roles: Roles) -> bool:
    """True when some input axis is the cache length (a decoder graph with ``past_key_values`` inputs)."""
    return any(r in (PAST, TOTAL) for axes in roles.values() for r in axes)


def check_profiles(roles: Roles, profiles: Sequence[ShapeProfile]) -> None:
    """A decoder with a KV cache needs ``--past``; any other graph must not get one (ConfigError, exit 2)."""
    decoder = needs_past(roles)
    for profile in profiles:
        if decoder and profile.past is None:
            cache = sorted(n for n in roles if PAST_INPUT.match(n))[:2]
            raise ConfigError(
                f"the model takes a KV cache ({', '.join(cache)}, ...): give its length range with --past "
                "min,opt,max (for example --past 0,128,1024)"
            )
        if not decoder and profile.past is not None:
            raise ConfigError("--past is only for decoder graphs with past_key_values.* inputs; this model has none")


def _range(role: str, profile: ShapeProfile) -> DimRange:
    if role == BATCH:
        return profile.batch
    if role == SEQ:
        return profile.seq
    if profile.past is None:
        raise ConfigError("this input has a KV-cache axis: give --past min,opt,max")
    if role == PAST:
        return profile.past
    return DimRange(min=profile.past.min + profile.seq.min, opt=profile.past.opt + profile.seq.opt,
                    max=profile.past.max + profile.seq.max)


def profile_shapes(
    name: str, shape: Sequence[int], profile: ShapeProfile, roles: Roles | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """min/opt/max shapes of input ``name`` (``shape``: -1 where dynamic) under ``profile``.

    Without ``roles`` (no ONNX graph at hand) axis 0 is the batch and axis 1 the sequence.
    """
    axes = roles.get(name) if roles is not None else None
    shapes: list[list[int]] = [[], [], []]
    for axis, dim in enumerate(shape):
        if dim >= 0:
            for s in shapes:
                s.append(int(dim))
            continue
        role = axes[axis] if axes is not None and axis < len(axes) else (BATCH, SEQ)[axis] if axis < 2 else None
        if role is None:
            raise ConfigError(
                f"input {name!r} has a dynamic axis {axis} (shape {list(shape)}) that is not a batch, sequence or "
                "KV-cache length; export the model with that dimension fixed"
            )
        for s, value in zip(shapes, _range(role, profile).to_list(), strict=True):
            s.append(value)
    return tuple(shapes[0]), tuple(shapes[1]), tuple(shapes[2])
