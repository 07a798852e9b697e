"""Recipe stage: YAML (de)serialization of recipes and the presets shipped with the package.

Presets live in ``builder/recipes/presets/<name>.yaml`` (package data). YAML is only a serialization:
every document is turned into typed objects by :func:`builder.recipes.model.recipe_from_dict`, which
rejects unknown keys.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any

import yaml

from builder.recipes.model import Recipe, recipe_from_dict
from calib.errors import ConfigError, suggest

PRESET_PACKAGE = "builder.recipes.presets"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects a key given twice in one mapping (YAML would keep the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"recipe YAML: key {key!r} appears twice (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def recipe_from_yaml(text: str, where: str = "recipe") -> Recipe:
    """Parse a recipe from YAML text."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    return recipe_from_dict(data, where)


def recipe_to_yaml(recipe: Recipe) -> str:
    """Serialize a recipe as YAML (deterministic key order: the order of the dataclasses)."""
    return str(yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None, width=110))


def recipe_to_json(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), indent=2, sort_keys=True) + "\n"


def recipe_from_json(text: str) -> Recipe:
    return recipe_from_dict(json.loads(text))


def preset_names() -> list[str]:
    """Names of the presets shipped with the package, sorted."""
    folder = importlib.resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> Recipe:
    """A shipped preset by name; unknown names get the list of presets and close matches."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown recipe preset {name!r}; presets: {', '.join(names)}{suggest(name, names)}")
    text = importlib.resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    recipe = recipe_from_yaml(text, where=f"preset {name}")
    if recipe.name != name:
        raise ConfigError(f"preset file {name}.yaml declares name {recipe.name!r}")
    return recipe


def load_recipe(spec: str) -> Recipe:
    """A preset name, or a path to a recipe YAML file (a path must end in .yaml or .yml)."""
    if spec.endswith((".yaml", ".yml")):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"recipe file {spec!r} does not exist")
        return recipe_from_yaml(path.read_text(encoding="utf-8"), where=str(path))
    return load_preset(spec)
