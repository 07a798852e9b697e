"""Precision search (recipe side): the units the search may keep in FP16/BF16, and the recipe of a choice.

A *unit* is a group of nodes that the base recipe runs in INT8 and that the search falls back together:

    layer-role   one role in one block (``layer.3.fc2``), or a role outside the blocks (``embed_ln``)  [default]
    layer        every INT8 node of one block (``layer.3``)
    node         one node

A choice (the set of units kept in 16 bits) becomes a recipe: the base recipe's rules, then fallback rules
(last match wins), grouped so that roles falling back in the same layers share one rule:

    - select: {roles: [attn_qk, attn_pv], layers: [0, 5]}
      set: {precision: fp16}

Nodes outside the blocks are selected by role and escaped node name, so a rule never reaches further than
its unit. Islands count the maximal runs of fallen-back units in graph order (neighbouring units in 16 bits
make one island: one pair of Casts around them).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from builder.graph.report import GraphReport, Role
from builder.plan.artifact import QuantPlan
from builder.recipes.model import Precision, Recipe, Rule, Selector, Settings

SEARCH_NOTE = "precision search"


class Granularity(StrEnum):
    LAYER_ROLE = "layer-role"
    LAYER = "layer"
    NODE = "node"


@dataclass(frozen=True, kw_only=True)
class Unit:
    """Nodes that fall back together, with their GEMM work (2 x MACs per sequence, from the plan)."""

    key: str
    layer: int | None
    roles: tuple[Role, ...]
    nodes: tuple[str, ...]
    gemm_flops: float
    position: int  # graph order of its first node among the analysed nodes


def glob_escape(name: str) -> str:
    """``name`` as an fnmatch glob matching exactly itself (``[``, ``*`` and ``?`` bracketed)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _key(granularity: Granularity, layer: int | None, role: Role, node: str) -> str:
    if granularity == Granularity.NODE:
        return node
    if granularity == Granularity.LAYER:
        return "outside" if layer is None else f"layer.{layer}"
    return role.value if layer is None else f"layer.{layer}.{role.value}"


def search_units(report: GraphReport, plan: QuantPlan, granularity: Granularity = Granularity.LAYER_ROLE
                 ) -> tuple[Unit, ...]:
    """The units of ``plan``'s INT8 nodes, in graph order."""
    position = {a.node: i for i, a in enumerate(report.assignments)}
    groups: dict[str, list[tuple[int, str, Role, int | None, float]]] = {}
    for n in plan.nodes:
        if n.precision != Precision.INT8 or n.node not in position:
            continue
        role = Role(n.role)
        groups.setdefault(_key(granularity, n.layer, role, n.node), []).append(
            (position[n.node], n.node, role, n.layer, n.gemm_flops))
    units = []
    for key, members in groups.items():
        members.sort()
        units.append(Unit(key=key, layer=members[0][3], roles=tuple(dict.fromkeys(m[2] for m in members)),
                          nodes=tuple(m[1] for m in members), gemm_flops=float(sum(m[4] for m in members)),
                          position=members[0][0]))
    return tuple(sorted(units, key=lambda u: u.position))


def islands(units: Sequence[Unit], fallback: Collection[str]) -> int:
    """Maximal runs of fallen-back units in graph order."""
    count, inside = 0, False
    for unit in sorted(units, key=lambda u: u.position):
        now = unit.key in fallback
        count += now and not inside
        inside = now
    return count


def fallback_rules(report: GraphReport, units: Sequence[Unit], fallback: Collection[str], precision: Precision,
                   note: str) -> tuple[Rule, ...]:
    """Rules that put exactly the units ``fallback`` in ``precision`` (to append after the base recipe's)."""
    chosen = [u for u in units if u.key in fallback]
    settings = Settings(precision=precision)
    role_layers: dict[Role, list[int]] = {}
    named: list[str] = []
    for unit in chosen:
        if unit.layer is not None and _exact(report, unit):
            for role in unit.roles:
                role_layers.setdefault(role, []).append(unit.layer)
        else:
            named.extend(unit.nodes)
    merged: dict[tuple[int, ...], list[Role]] = {}
    for role, layers in role_layers.items():  # roles that fall back in the same layers share one rule
        merged.setdefault(tuple(sorted(set(layers))), []).append(role)
    rules = [Rule(select=Selector(roles=tuple(sorted(roles, key=lambda r: r.value)), layers=layers), set=settings,
                  note=note)
             for layers, roles in sorted(merged.items(), key=lambda kv: (kv[0], sorted(r.value for r in kv[1])))]
    if named:
        rules.append(Rule(select=Selector(names=tuple(glob_escape(n) for n in named)), set=settings, note=note))
    return tuple(rules)


def _exact(report: GraphReport, unit: Unit) -> bool:
    """Whether the selector (unit's layer, unit's roles) picks exactly the unit's nodes."""
    picked = {a.node for a in report.assignments if a.layer == unit.layer and a.role in unit.roles}
    return picked == set(unit.nodes)


def search_recipe(base: Recipe, report: GraphReport, units: Sequence[Unit], fallback: Collection[str],
                  precision: Precision, budget: str, name: str | None = None) -> Recipe:
    """``base`` with the fallback rules of ``fallback`` appended, named ``<base>-search`` by default."""
    rules = fallback_rules(report, units, fallback, precision,
                           f"{SEARCH_NOTE}: kept in {precision.value} for {budget}")
    description = (f"{base.name} with {len(fallback)} of {len(units)} search units in {precision.value}, found by "
                   f"`build-engine search` for the budget {budget}. " + base.description).strip()
    return replace(base.with_rules(rules), name=name or f"{base.name}-search", description=description)
