"""Recipes: the YAML schema, loading with line-numbered errors, and mergekit translation."""

from surgeon.recipe.loader import LoadedRecipe, load_recipe, parse_recipe
from surgeon.recipe.schema import STEP_MODELS, Recipe

__all__ = ["LoadedRecipe", "Recipe", "STEP_MODELS", "load_recipe", "parse_recipe"]
