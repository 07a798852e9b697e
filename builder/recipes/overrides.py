"""Recipe stage: user overrides such as ``--fallback layer.5.fc2=fp16`` or ``--fallback role:softmax=bf16``.

Target forms (one per override):

    layer.<i>            every node of block i
    layer.<i>.<role>     one role in block i            (layer.5.fc2)
    role:<role>          a role in every block          (role:softmax, role:attn_qk)
    name:<glob>          node names matching a glob     (name:*/output/dense/MatMul)

Values: fp16, bf16, fp32 (fp32 keeps the model's own precision). Overrides become rules appended after
the recipe's rules, so they win. The same target given twice with different values is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from builder.graph.report import GraphReport
from builder.recipes.model import Precision, Rule, Selector, Settings, parse_role
from calib.errors import ConfigError, suggest

FALLBACK_VALUES = (Precision.FP16, Precision.BF16, Precision.FP32)
_LAYER_RE = re.compile(r"^layer\.(\d+)(?:\.([A-Za-z0-9_]+))?$")


@dataclass(frozen=True, kw_only=True)
class Override:
    target: str
    precision: Precision
    selector: Selector

    def to_rule(self) -> Rule:
        return Rule(select=self.selector, set=Settings(precision=self.precision),
                    note=f"user override --fallback {self.target}={self.precision.value}")


def parse_fallback(text: str) -> Override:
    """Parse one ``TARGET=DTYPE`` override."""
    if text.count("=") != 1:
        raise ConfigError(f"--fallback {text!r}: expected TARGET=DTYPE, e.g. layer.5.fc2=fp16 or role:softmax=bf16")
    target, value = (part.strip() for part in text.split("="))
    allowed = [p.value for p in FALLBACK_VALUES]
    if value not in allowed:
        raise ConfigError(f"--fallback {text!r}: dtype {value!r} not allowed; use {', '.join(allowed)}"
                          f"{suggest(value, allowed)}")
    precision = Precision(value)
    match = _LAYER_RE.match(target)
    if match:
        layer = int(match.group(1))
        roles = (parse_role(match.group(2)),) if match.group(2) else ()
        return Override(target=target, precision=precision, selector=Selector(layers=(layer,), roles=roles))
    if target.startswith("role:"):
        return Override(target=target, precision=precision, selector=Selector(roles=(parse_role(target[5:]),)))
    if target.startswith("name:") and len(target) > 5:
        return Override(target=target, precision=precision, selector=Selector(names=(target[5:],)))
    raise ConfigError(f"--fallback {text!r}: target {target!r} not understood; use layer.<i>, layer.<i>.<role>, "
                      "role:<role> or name:<glob>")


def parse_fallbacks(texts: list[str] | tuple[str, ...]) -> tuple[Override, ...]:
    """Parse every override; the same target with two different dtypes is a conflict."""
    seen: dict[str, Override] = {}
    for text in texts:
        override = parse_fallback(text)
        key = override.target.replace("role:softmax", "role:attn_softmax")
        previous = seen.get(key)
        if previous is not None and previous.precision != override.precision:
            raise ConfigError(f"conflicting overrides for {override.target!r}: {previous.precision.value} and "
                              f"{override.precision.value}")
        seen[key] = override
    return tuple(seen.values())


def known_targets(report: GraphReport) -> list[str]:
    """Every ``layer.<i>`` and ``layer.<i>.<role>`` target the report offers, for suggestions."""
    targets = set()
    for a in report.assignments:
        if a.layer is not None:
            targets.add(f"layer.{a.layer}")
            targets.add(f"layer.{a.layer}.{a.role.value}")
        targets.add(f"role:{a.role.value}")
    return sorted(targets)


def check_overrides(overrides: tuple[Override, ...], report: GraphReport) -> None:
    """Every override must select at least one node of ``report``; errors carry close matches."""
    layers = sorted({a.layer for a in report.assignments if a.layer is not None})
    targets = known_targets(report)
    for o in overrides:
        sel = o.selector
        matched = [a for a in report.assignments
                   if (not sel.layers or a.layer in sel.layers) and (not sel.roles or a.role in sel.roles)]
        if sel.names:
            continue  # checked when the recipe is resolved (globs are matched against node names there)
        if matched:
            continue
        if sel.layers and sel.layers[0] not in layers:
            span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
            raise ConfigError(f"--fallback {o.target}: layer {sel.layers[0]} does not exist (the model has {span})"
                              f"{suggest(o.target, targets)}")
        raise ConfigError(f"--fallback {o.target}: no node has this role in the model"
                          f"{suggest(o.target, targets)}")
