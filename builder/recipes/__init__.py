"""Recipe stage: typed recipes, YAML presets, selectors and user overrides."""

from builder.recipes.loader import load_preset, load_recipe, preset_names, recipe_from_yaml, recipe_to_yaml
from builder.recipes.model import Precision, Recipe, Rule, Selector, Settings
from builder.recipes.overrides import check_overrides, parse_fallbacks

__all__ = [
    "Precision",
    "Recipe",
    "Rule",
    "Selector",
    "Settings",
    "check_overrides",
    "load_preset",
    "load_recipe",
    "parse_fallbacks",
    "preset_names",
    "recipe_from_yaml",
    "recipe_to_yaml",
]
