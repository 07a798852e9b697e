"""Recipe stage: the typed recipe objects (what to quantize, how, and what stays in higher precision).

A recipe is a list of ordered rules. Each rule has a :class:`Selector` (role, layer index, node-name glob,
or "layers the outlier report flags") and a partial :class:`Settings`. For every node and every settings
field, the last matching rule that sets the field wins; fields no rule sets come from ``defaults``.
YAML is only a serialization of these objects (see :mod:`builder.recipes.loader`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from builder.graph.report import Role
from calib.errors import ConfigError, suggest
from calib.schema import Schema

RECIPE_VERSION = 2


class Precision(StrEnum):
    """Where a node runs. ``fp32`` keeps the model's own precision (no Q/DQ, no Casts)."""

    INT8 = "int8"
    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"


def _roles(*names: str) -> frozenset[Role]:
    """The roles of ``names`` that this analysis knows (decoder roles are added to Role as analysis grows)."""
    return frozenset(Role(n) for n in names if n in Role._value2member_map_)


# Roles whose INT8 form quantizes the activation input of a GEMM with a weight initializer.
WEIGHT_GEMM_ROLES = _roles("qkv", "q_proj", "k_proj", "v_proj", "attn_out", "fc1", "gate_proj", "up_proj", "fc2",
                           "lm_head", "gemm")
# Roles whose INT8 form quantizes both activation operands of a batched MatMul.
ACT_GEMM_ROLES = _roles("attn_qk", "attn_pv")
# Roles whose INT8 form quantizes the node's output for every consumer.
OUTPUT_ROLES = _roles("attn_softmax", "embed_ln", "attn_ln", "ffn_ln", "final_ln")
# Roles that never take INT8 (the residual stream stays 16/32-bit).
NON_INT8_ROLES = _roles("attn_residual", "ffn_residual", "ffn_act")

ROLE_ALIASES: dict[str, Role] = {
    "softmax": Role.ATTN_SOFTMAX,
    "qk": Role.ATTN_QK,
    "pv": Role.ATTN_PV,
    "o_proj": Role.ATTN_OUT,
    "wo": Role.ATTN_OUT,
    "ffn_in": Role.FC1,
    "ffn_out": Role.FC2,
    "down_proj": Role.FC2,
}


def parse_role(text: str) -> Role:
    """A role from its recipe name or a documented alias (``softmax`` -> ``attn_softmax``)."""
    if text in ROLE_ALIASES:
        return ROLE_ALIASES[text]
    try:
        return Role(text)
    except ValueError:
        known = [r.value for r in Role] + sorted(ROLE_ALIASES)
        raise ConfigError(f"unknown role {text!r}; known roles: {', '.join(known)}{suggest(text, known)}") from None


def _enum(kind: type[StrEnum], value: Any, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        known = [str(m.value) for m in kind]
        raise ConfigError(
            f"{what} {value!r} is not allowed; use one of {', '.join(known)}{suggest(str(value), known)}"
        ) from None


@dataclass(frozen=True, kw_only=True)
class Selector:
    """Which nodes a rule applies to. Fields combine with AND; the values inside one field with OR.

    An empty selector matches every node the analysis gave a role. ``flagged`` restricts to the layers
    the outlier report flags. A selector that matches nothing is an error unless ``optional``.
    """

    roles: tuple[Role, ...] = ()
    layers: tuple[int, ...] = ()
    names: tuple[str, ...] = ()  # fnmatch globs over node names
    flagged: bool = False
    optional: bool = False

    def __post_init__(self) -> None:
        for layer in self.layers:
            if layer < 0:
                raise ConfigError(f"selector layer {layer} is negative; layers count from 0")

    def describe(self) -> str:
        parts = []
        if self.roles:
            parts.append("roles=" + ",".join(r.value for r in self.roles))
        if self.layers:
            parts.append("layers=" + ",".join(str(i) for i in self.layers))
        if self.names:
            parts.append("names=" + ",".join(self.names))
        if self.flagged:
            parts.append("flagged layers")
        return " ".join(parts) or "every node"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.roles:
            data["roles"] = [r.value for r in self.roles]
        if self.layers:
            data["layers"] = list(self.layers)
        if self.names:
            data["names"] = list(self.names)
        if self.flagged:
            data["flagged"] = True
        if self.optional:
            data["optional"] = True
        return data


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What a rule sets. ``None`` means "not set by this rule"; a later rule's value replaces an earlier one.

    ``activation`` and ``weight`` are the typed configs of registered quantizers (builder.quant.registry):
    ``activation`` quantizes the GEMM input (weight GEMMs), both operands (batched attention MatMuls) or the
    output (LayerNorm, softmax) of a node in INT8; ``weight`` quantizes the weight of an INT8 weight GEMM.
    """

    precision: Precision | None = None
    activation: Schema | None = None
    weight: Schema | None = None
    bias_correction: bool | None = None  # INT8 weight GEMMs: empirical bias correction on the calibration data

    def merged(self, later: Settings) -> Settings:
        """These settings with every field ``later`` sets taken from ``later`` (last match wins)."""
        updates = {f.name: getattr(later, f.name) for f in fields(later) if getattr(later, f.name) is not None}
        return replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        from builder.quant.registry import config_to_dict

        data: dict[str, Any] = {}
        if self.precision is not None:
            data["precision"] = self.precision.value
        if self.activation is not None:
            data["activation"] = config_to_dict(self.activation)
        if self.weight is not None:
            data["weight"] = config_to_dict(self.weight)
        if self.bias_correction is not None:
            data["bias_correction"] = self.bias_correction
        return data


def full_defaults() -> Settings:
    """Built-in defaults: model precision, static max-range activations, 8-bit RTN weights, no correction."""
    from builder.quant.rtn import RtnConfig
    from builder.quant.static import StaticConfig

    return Settings(precision=Precision.FP32, activation=StaticConfig(), weight=RtnConfig(), bias_correction=False)


@dataclass(frozen=True, kw_only=True)
class Rule:
    select: Selector
    set: Settings
    note: str = ""  # why the rule exists; copied into the plan's reasons

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"select": self.select.to_dict(), "set": self.set.to_dict()}
        if self.note:
            data["note"] = self.note
        return data


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A named quantization recipe: defaults plus ordered rules (for each field, the last match wins)."""

    name: str
    description: str = ""
    defaults: Settings = field(default_factory=Settings)
    rules: tuple[Rule, ...] = ()
    provenance: str = ""  # where the recipe's choices come from (paper section, reconstruction notes)
    model_dtype: Precision = Precision.FP32  # fp16: convert the whole graph (the FP16 baseline engine)
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.model_dtype not in (Precision.FP32, Precision.FP16):
            raise ConfigError(f"recipe model_dtype {self.model_dtype.value!r} not supported; use fp32 or fp16")
        if not self.name or not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"recipe name {self.name!r} must be a non-empty word (letters, digits, - _ .)")

    @property
    def resolved_defaults(self) -> Settings:
        """Built-in defaults overlaid with the recipe's own ``defaults``."""
        return full_defaults().merged(self.defaults)

    @property
    def uses_bias_correction(self) -> bool:
        """Whether any rule (or the defaults) asks for bias correction, which needs the calibration data."""
        return any(s.bias_correction for s in (self.defaults, *(r.set for r in self.rules)))

    def with_rules(self, extra: tuple[Rule, ...]) -> Recipe:
        """A copy with ``extra`` rules appended (they win over every earlier rule)."""
        return replace(self, rules=self.rules + extra)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": self.version, "name": self.name}
        if self.description:
            data["description"] = self.description
        if self.provenance:
            data["provenance"] = self.provenance
        if self.model_dtype != Precision.FP32:
            data["model_dtype"] = self.model_dtype.value
        data["defaults"] = self.defaults.to_dict()
        data["rules"] = [r.to_dict() for r in self.rules]
        return data


def selector_from_dict(data: Any, where: str) -> Selector:
    """Build a Selector from parsed YAML/JSON, rejecting unknown keys."""
    mapping = _mapping(data, where, {"roles", "layers", "names", "flagged", "optional"})
    roles = tuple(parse_role(str(r)) for r in _list(mapping.get("roles", []), f"{where}.roles"))
    layers_raw = _list(mapping.get("layers", []), f"{where}.layers")
    for value in layers_raw:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}.layers: {value!r} is not a layer index (an integer from 0)")
    names = tuple(str(n) for n in _list(mapping.get("names", []), f"{where}.names"))
    return Selector(roles=roles, layers=tuple(layers_raw), names=names,
                    flagged=_bool(mapping.get("flagged", False), f"{where}.flagged"),
                    optional=_bool(mapping.get("optional", False), f"{where}.optional"))


def settings_from_dict(data: Any, where: str) -> Settings:
    """Build Settings from parsed YAML/JSON, rejecting unknown keys, quantizers and options."""
    from builder.quant.registry import activation_config, weight_config

    mapping = _mapping(data, where, {f.name for f in fields(Settings)})
    return Settings(
        precision=None if mapping.get("precision") is None
        else _enum(Precision, mapping["precision"], f"{where}.precision"),
        activation=None if mapping.get("activation") is None
        else activation_config(mapping["activation"], f"{where}.activation"),
        weight=None if mapping.get("weight") is None else weight_config(mapping["weight"], f"{where}.weight"),
        bias_correction=None if mapping.get("bias_correction") is None
        else _bool(mapping["bias_correction"], f"{where}.bias_correction"),
    )


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    """Build a Recipe from parsed YAML/JSON. Unknown keys and missing required keys are errors."""
    mapping = _mapping(data, where, {"version", "name", "description", "provenance", "model_dtype", "defaults",
                                         "rules"})
    if "name" not in mapping:
        raise ConfigError(f"{where}: missing required key 'name'")
    if "rules" not in mapping:
        raise ConfigError(f"{where}: missing required key 'rules' (an empty list is allowed)")
    version = mapping.get("version", RECIPE_VERSION)
    if version == 1:
        raise ConfigError(f"{where}: recipe version 1 (flat keys scheme, range, center, alpha, groups) is no longer "
                          "read; write version 2, which names quantizers: `activation: {quantizer: static|centered|"
                          "fwq|peg, ...}` and `weight: {quantizer: rtn, bits: 8}` (builder/recipes/README.md)")
    if version != RECIPE_VERSION:
        raise ConfigError(f"{where}: recipe version {version!r} not supported; expected {RECIPE_VERSION}")
    rules = []
    for index, raw in enumerate(_list(mapping["rules"], f"{where}.rules")):
        rule_where = f"{where}.rules[{index}]"
        rule_map = _mapping(raw, rule_where, {"select", "set", "note"})
        if "set" not in rule_map:
            raise ConfigError(f"{rule_where}: missing required key 'set'")
        rules.append(Rule(select=selector_from_dict(rule_map.get("select", {}), f"{rule_where}.select"),
                          set=settings_from_dict(rule_map["set"], f"{rule_where}.set"),
                          note=str(rule_map.get("note", ""))))
    return Recipe(name=str(mapping["name"]), description=str(mapping.get("description", "")).strip(),
                  provenance=str(mapping.get("provenance", "")).strip(),
                  defaults=settings_from_dict(mapping.get("defaults", {}), f"{where}.defaults"),
                  model_dtype=_enum(Precision, mapping.get("model_dtype", "fp32"), f"{where}.model_dtype"),
                  rules=tuple(rules))


def _mapping(data: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r}; allowed keys: {', '.join(sorted(allowed))}"
                f"{suggest(str(key), allowed)}"
            )
    return dict(data)


def _list(data: Any, where: str) -> list[Any]:
    if isinstance(data, (str, int)) and not isinstance(data, bool):
        return [data]
    if not isinstance(data, list):
        raise ConfigError(f"{where}: expected a list, got {type(data).__name__}")
    return list(data)


def _bool(data: Any, where: str) -> bool:
    if not isinstance(data, bool):
        raise ConfigError(f"{where}: expected true or false, got {data!r}")
    return data
