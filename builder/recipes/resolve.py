"""Recipe stage: resolve a recipe against a GraphReport (which settings apply to which node, and why).

For each node the analysis gave a role, the settings are the recipe's defaults overlaid, field by field,
with every matching rule in order: the last matching rule that sets a field wins. The rule that decided the
precision is remembered, so the plan can give a reason for every node left in higher precision.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection
from dataclasses import dataclass

from builder.graph.report import GraphReport, RoleAssignment
from builder.recipes.model import Recipe, Rule, Selector, Settings
from calib.errors import ConfigError, suggest


@dataclass(frozen=True, kw_only=True)
class ResolvedNode:
    assignment: RoleAssignment
    settings: Settings  # every field set
    precision_rule: int | None  # index of the rule that set the precision; None = recipe defaults
    precision_note: str


def selector_matches(sel: Selector, a: RoleAssignment, flagged: Collection[int]) -> bool:
    """Whether ``sel`` selects the node of assignment ``a``."""
    if sel.roles and a.role not in sel.roles:
        return False
    if sel.layers and a.layer not in sel.layers:
        return False
    if sel.flagged and (a.layer is None or a.layer not in flagged):
        return False
    return not sel.names or any(fnmatch.fnmatchcase(a.node, glob) for glob in sel.names)


def _describe_rule(index: int, rule: Rule) -> str:
    return f"rule {index} ({rule.select.describe()})"


def _check_matches(recipe: Recipe, report: GraphReport, flagged: Collection[int]) -> None:
    roles = sorted({a.role.value for a in report.assignments})
    layers = sorted({a.layer for a in report.assignments if a.layer is not None})
    for index, rule in enumerate(recipe.rules):
        sel = rule.select
        if sel.optional or any(selector_matches(sel, a, flagged) for a in report.assignments):
            continue
        hints = []
        for role in sel.roles:
            if role.value not in roles:
                hints.append(f"role {role.value!r} is not in the model{suggest(role.value, roles)}")
        for layer in sel.layers:
            if layer not in layers:
                span = f"{layers[0]}-{layers[-1]}" if layers else "none"
                hints.append(f"layer {layer} does not exist (layers {span})")
        if sel.names:
            nodes = [a.node for a in report.assignments]
            hints.append(f"no node name matches {', '.join(sel.names)}{suggest(sel.names[0], nodes)}")
        if sel.flagged and not flagged:
            hints.append("the outlier report flags no layer")
        detail = "; ".join(hints) if hints else "the conditions exclude each other in this model"
        raise ConfigError(f"recipe {recipe.name!r} {_describe_rule(index, rule)} matches no node: {detail}. "
                          "Mark the selector `optional: true` if that is intended.")


def resolve(recipe: Recipe, report: GraphReport,
            flagged: Collection[int] | None = None) -> dict[str, ResolvedNode]:
    """Settings of every node with a role, keyed by node name, in report order.

    ``flagged`` are the layers the outlier report flags; a recipe selecting flagged layers needs it.
    """
    if flagged is None:
        if any(rule.select.flagged for rule in recipe.rules):
            raise ConfigError(f"recipe {recipe.name!r} selects the layers the outlier report flags; "
                              "pass the outlier report (--outliers)")
        flagged = ()
    _check_matches(recipe, report, flagged)
    base = recipe.resolved_defaults
    resolved: dict[str, ResolvedNode] = {}
    for a in report.assignments:
        settings = base
        precision_rule: int | None = None
        note = "recipe defaults"
        for index, rule in enumerate(recipe.rules):
            if not selector_matches(rule.select, a, flagged):
                continue
            settings = settings.merged(rule.set)
            if rule.set.precision is not None:
                precision_rule = index
                note = f"{_describe_rule(index, rule)}" + (f": {rule.note}" if rule.note else "")
        resolved[a.node] = ResolvedNode(assignment=a, settings=settings, precision_rule=precision_rule,
                                        precision_note=note)
    return resolved
