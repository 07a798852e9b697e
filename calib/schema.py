"""Artifact schemas shared by every stage: frozen, versioned, strict msgspec Structs.

Every artifact and every typed config derives from :class:`Schema`: frozen, keyword-only, and decoding
rejects unknown keys. Decoding goes through :func:`decode_json` / :func:`convert`, which turn msgspec's
validation errors into a :class:`ConfigError` that names the bad key or value, where it sits, and (for an
unknown key) the keys that are allowed there with a close match:

    plan.json: unknown key 'ofset' at $.activations[0].params; allowed: amax, method, offset (did you mean
    'offset'?)

msgspec rather than pydantic: the artifacts are plain data with large numeric lists (per-channel scales,
per-dimension ranges) that must round-trip exactly and load fast; msgspec Structs are frozen, typed,
strict (``forbid_unknown_fields``), decode tagged unions by a tag field (how recipes name quantizers) and
add no validation framework on top of the dataclass-like declarations mypy already checks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from calib.errors import ConfigError, suggest

T = TypeVar("T")

_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<key>[^`]*)`(?: - at `(?P<path>[^`]*)`)?$")
_AT = re.compile(r" - at `(?P<path>[^`]*)`$")
_ENUM = re.compile(r"^Invalid enum value (?P<value>.+) - at `(?P<path>[^`]*)`$")
_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[(\.\.\.)\]")  # .field, [index], [...] (a dict value)


class Schema(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every artifact and typed config: frozen, keyword-only, unknown keys rejected on decode."""


def _type_at(root: Any, path: str) -> Any:
    """The msgspec type info found at ``path`` (``$.a[0].b``) inside type ``root`` (None when unknown)."""
    info: Any = msgspec.inspect.type_info(root)
    for match in _SEGMENT.finditer(path.removeprefix("$")):
        info = _unwrap(info)
        name, index, key = match.groups()
        if name is not None and isinstance(info, msgspec.inspect.StructType):
            info = next((f.type for f in info.fields if f.encode_name == name), None)
        elif (index is not None or key is not None) and isinstance(
                info, (msgspec.inspect.ListType, msgspec.inspect.VarTupleType, msgspec.inspect.SetType,
                       msgspec.inspect.FrozenSetType)):
            info = info.item_type
        elif index is not None and isinstance(info, msgspec.inspect.TupleType):
            info = info.item_types[int(index)] if int(index) < len(info.item_types) else None
        elif isinstance(info, msgspec.inspect.DictType):
            info = info.value_type
        else:
            return None
        if info is None:
            return None
    return _unwrap(info)


def _fields_at(root: Any, path: str) -> list[str] | None:
    """The field names of the Struct found at ``path`` inside type ``root``, if known."""
    info = _type_at(root, path)
    if isinstance(info, msgspec.inspect.StructType):
        return [f.encode_name for f in info.fields]
    return None


def _choices_at(root: Any, path: str) -> list[str] | None:
    """The allowed values of the enum or literal found at ``path`` inside type ``root``, if known."""
    info = _type_at(root, path)
    if isinstance(info, msgspec.inspect.EnumType):
        return [str(m.value) for m in info.cls]
    if isinstance(info, msgspec.inspect.LiteralType):
        return [str(v) for v in info.values]
    return None


def _unwrap(info: Any) -> Any:
    """The one non-None member of an Optional (unions of several Structs stay unions)."""
    if isinstance(info, msgspec.inspect.UnionType):
        members = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(members) == 1:
            return members[0]
    return info


def _explain(exc: msgspec.ValidationError, type_: Any, where: str) -> ConfigError:
    text = str(exc)
    unknown = _UNKNOWN.match(text)
    if unknown is not None:
        key, path = unknown.group("key"), unknown.group("path") or "$"
        allowed = _fields_at(type_, path)
        detail = f"; allowed: {', '.join(allowed)}{suggest(key, allowed)}" if allowed else ""
        return ConfigError(f"{where}: unknown key {key!r} at {path}{detail}")
    enum = _ENUM.match(text)
    if enum is not None:
        choices = _choices_at(type_, enum.group("path"))
        value = enum.group("value").strip("'\"")
        hint = f"; allowed: {', '.join(choices)}{suggest(value, choices)}" if choices else ""
        return ConfigError(f"{where}: {value!r} is not allowed at {enum.group('path')}{hint}")
    at = _AT.search(text)
    if at is not None:
        return ConfigError(f"{where}: {text[: at.start()]} at {at.group('path')}")
    return ConfigError(f"{where}: {text}")


def convert(data: Any, type_: type[T], where: str) -> T:
    """``data`` (parsed JSON or YAML) as ``type_``; unknown keys and wrong types raise ConfigError."""
    try:
        return msgspec.convert(data, type=type_, strict=True)
    except msgspec.ValidationError as exc:
        raise _explain(exc, type_, where) from None


def decode_json(text: str | bytes, type_: type[T], where: str, *, version: int | None = None) -> T:
    """Decode JSON ``text`` into ``type_``; with ``version``, the object's ``version`` must equal it first."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}") from None
    if version is not None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} JSON must be an object, got {type(data).__name__}")
        if data.get("version") != version:
            raise ConfigError(f"{where} version {data.get('version')!r} not supported; expected {version}")
    return convert(data, type_, where)


def to_builtins(value: Any) -> Any:
    """Plain JSON-compatible data of a Schema (or anything msgspec encodes); Structs as dicts in field order."""
    return msgspec.to_builtins(value, order="deterministic")


def to_json(value: Any) -> str:
    """Canonical JSON of ``value`` (sorted keys, two-space indent, trailing newline; NaN refused)."""
    return json.dumps(to_builtins(value), sort_keys=True, indent=2, allow_nan=False) + "\n"
