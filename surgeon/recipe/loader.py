"""Load a recipe file: YAML with line numbers, schema validation, step parsing.

Every error names the recipe file, the YAML line, the field path (such as
`steps[0].tli.every`) and, where the field takes a fixed set of values, the
valid choices.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from surgeon.errors import RecipeError
from surgeon.recipe.schema import STEP_MODELS, Recipe

# The key of the checkpoint given on the command line (`surgeon apply RECIPE IN OUT`).
COMMAND_LINE_MODEL = "input"


@dataclass
class LoadedRecipe:
    """A validated recipe with its parsed steps and the exact text it came from."""

    recipe: Recipe
    steps: list[tuple[str, BaseModel]]
    text: str
    path: str
    source_format: str = "surgeon"
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.recipe.name or Path(self.path).stem


# A recipe is a few hundred nodes; aliases that expand past this are an attack or a mistake.
MAX_EXPANDED_NODES = 100_000


class _RecipeYamlLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects duplicate keys, which plain YAML loading silently overwrites."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """Count the nodes the document has once every alias is expanded, without expanding them."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) not in sizes:
            children = []
            if isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = node.value
            sizes[id(node)] = 1 + sum(size(child) for child in children)
        return sizes[id(node)]

    return size(root)


def _compose(text: str) -> yaml.Node | None:
    """Return the YAML node graph of a recipe whose duplicate keys and alias expansion are checked."""
    return yaml.compose(text, Loader=_RecipeYamlLoader)


def _line_map(text: str) -> dict[tuple, int]:
    """Map each YAML path (keys and list indices) to its 1-based line."""
    try:
        return _node_lines(_compose(text))
    except yaml.YAMLError:
        return {}


def _node_lines(root: yaml.Node | None) -> dict[tuple, int]:
    """Map each YAML path (keys and list indices) to its 1-based line; an aliased node is walked once."""
    lines: dict[tuple, int] = {}
    visited: set[int] = set()

    def walk(node: yaml.Node, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if id(node) in visited:
            return
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                lines[path + (key,)] = key_node.start_mark.line + 1
                walk(value_node, path + (key,))
                lines[path + (key,)] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, path + (index,))

    if root is not None:
        walk(root, ())
    return lines


def _format_path(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _nearest_line(lines: dict[tuple, int], path: tuple) -> int | None:
    while path and path not in lines:
        path = path[:-1]
    return lines.get(path)


def _model_in_annotation(annotation: Any) -> type[BaseModel] | None:
    """Return the pydantic model inside an annotation such as `Optional[list[LayerSlice]]`, or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in_annotation(argument)
        if found is not None:
            return found
    return None


def _raise_validation_error(error: ValidationError, prefix: tuple, lines: dict[tuple, int], path: str, model: type[BaseModel]) -> None:
    errors = error.errors()
    # An unknown field usually explains a missing one (a typo), so report it first.
    first = next((item for item in errors if item["type"] == "extra_forbidden"), errors[0])
    location = prefix + tuple(first["loc"])
    choices = None
    if first["type"] == "literal_error":
        choices = [str(choice) for choice in first["ctx"]["expected"].replace("'", "").split(" or ")]
        choices = [c.strip() for part in choices for c in part.split(",") if c.strip()]
    elif first["type"] == "extra_forbidden":
        parent = model
        for part in first["loc"][:-1]:
            if isinstance(part, int):
                continue
            field_info = getattr(parent, "model_fields", {}).get(part)
            parent = _model_in_annotation(getattr(field_info, "annotation", None)) or parent
        choices = list(getattr(parent, "model_fields", {}))
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"unknown field {first['loc'][-1]!r}"
    fix = None if choices else "correct the value; docs/recipes.md lists every field and what it accepts"
    raise RecipeError(
        message,
        path=path,
        line=_nearest_line(lines, location),
        field=_format_path(location),
        value=first.get("input"),
        choices=choices,
        fix=fix,
    ) from None


def parse_recipe(text: str, path: str = "<recipe>") -> LoadedRecipe:
    """Parse recipe text; mergekit configs are translated into a surgeon recipe first."""
    try:
        root = _compose(text)
        if root is not None and _expanded_size(root) > MAX_EXPANDED_NODES:
            raise RecipeError(
                f"recipe expands to more than {MAX_EXPANDED_NODES:,} YAML nodes through anchors and aliases",
                path=path,
                fix="write the recipe without deeply nested aliases",
            )
        data = yaml.load(text, Loader=_RecipeYamlLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise RecipeError(
            f"invalid YAML: {getattr(error, 'problem', error)}",
            path=path,
            line=mark.line + 1 if mark else None,
            fix="fix the YAML syntax at that line",
        ) from error
    except RecursionError as error:
        raise RecipeError("recipe nests YAML lists or mappings too deeply to parse", path=path, fix="write the recipe with at most a few levels of nesting") from error
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping", path=path, fix="start the file with `version: 1` and a `steps:` list")

    if "merge_method" in data or ("slices" in data and "version" not in data):
        from surgeon.recipe.mergekit import translate_mergekit

        return translate_mergekit(data, text, path)

    lines = _node_lines(root)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        _raise_validation_error(error, (), lines, path, Recipe)

    check_model_keys(recipe, path, lambda field_path: _nearest_line(lines, field_path))

    steps = []
    for index, step in enumerate(recipe.steps):
        if len(step) != 1:
            raise RecipeError(
                f"a step must have exactly one key naming its kind, found {sorted(step)}",
                path=path,
                line=_nearest_line(lines, ("steps", index)),
                field=f"steps[{index}]",
                choices=list(STEP_MODELS),
            )
        ((kind, options),) = step.items()
        if kind not in STEP_MODELS:
            raise RecipeError(
                f"unknown step kind {kind!r}",
                path=path,
                line=_nearest_line(lines, ("steps", index, kind)),
                field=f"steps[{index}]",
                value=kind,
                choices=list(STEP_MODELS),
            )
        model = STEP_MODELS[kind]
        try:
            steps.append((kind, model.model_validate(options if options is not None else {})))
        except ValidationError as error:
            _raise_validation_error(error, ("steps", index, kind), lines, path, model)
    return LoadedRecipe(recipe=recipe, steps=steps, text=text, path=path)


def model_references(recipe: Recipe) -> list[tuple[tuple, str]]:
    """Return every (field path, model key) pair in the recipe that names a source model."""
    references: list[tuple[tuple, str]] = []
    for index, layer_slice in enumerate(recipe.slices or []):
        references.append((("slices", index, "model"), layer_slice.model))
    for name in ("base_model", "tokenizer_model"):
        if getattr(recipe, name) is not None:
            references.append(((name,), getattr(recipe, name)))
    for name in ("embeddings", "head"):
        if getattr(recipe, name) is not None:
            references.append(((name, "model"), getattr(recipe, name).model))
    return references


def check_model_keys(recipe: Recipe, path: str, line_of=lambda field_path: None) -> None:
    """Reject a model key that is neither in `models` nor the command-line input `input`."""
    known = list(recipe.models) + [COMMAND_LINE_MODEL]
    for field_path, key in model_references(recipe):
        if key not in known:
            raise RecipeError(
                f"unknown model {key!r}",
                path=path,
                line=line_of(field_path),
                field=_format_path(field_path),
                value=key,
                choices=known,
            )


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read and validate the recipe file at `path`."""
    path = Path(path)
    if not path.exists() and "/" not in str(path):
        from surgeon.recipe.catalog import find_shipped_recipe

        path = find_shipped_recipe(str(path)) or path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("recipe file not found", path=path, fix="check the path, or give the name of a shipped recipe from `surgeon recipes`, such as tli_k4") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe: {error}", path=path, fix="pass a UTF-8 YAML file") from error
    return parse_recipe(text, str(path))
