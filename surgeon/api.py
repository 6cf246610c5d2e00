"""The Python API behind the CLI: plan, apply and inspect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgeon.architectures import detect_architecture, split_layers
from surgeon.checkpoint import Checkpoint, open_checkpoint
from surgeon.errors import RecipeError
from surgeon.plan import DEFAULT_MAX_SHARD_SIZE, DEFAULT_MODEL, Plan, compile_plan
from surgeon.recipe import LoadedRecipe, load_recipe
from surgeon.writer import WriteOptions, write_output


def resolve_model_reference(reference: str, recipe_path: str, field: str) -> Path:
    """Return the local folder a recipe's model reference names.

    A relative path resolves against the recipe file's folder first and, when
    nothing exists there, against the current directory.
    """
    if "://" in reference:
        raise RecipeError(
            f"model reference {reference!r} is not a local folder, and surgeon reads only local folders",
            path=recipe_path,
            field=field,
            value=reference,
            fix="download the model and give its folder path",
        )
    path = Path(reference).expanduser()
    candidates = [path] if path.is_absolute() else [Path(recipe_path).parent / path, path.absolute()]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise RecipeError(
        f"model folder {reference!r} not found (looked in {', '.join(str(candidate) for candidate in candidates)})",
        path=recipe_path,
        field=field,
        value=reference,
        fix="give an absolute path, or a path relative to the recipe file's folder",
    )


def open_inputs(recipe: LoadedRecipe, input_path: str | Path | None) -> dict[str, Checkpoint]:
    """Open the command-line input as model `input`, plus the models the recipe names under `models:`."""
    inputs: dict[str, Checkpoint] = {}
    if input_path is not None:
        inputs[DEFAULT_MODEL] = open_checkpoint(input_path)
    for key, reference in recipe.recipe.models.items():
        if key == DEFAULT_MODEL and input_path is not None:
            raise RecipeError(
                f"the recipe names a model {DEFAULT_MODEL!r}, which is also the key of the command-line input",
                path=recipe.path,
                field=f"models.{key}",
                fix="rename the model in the recipe, or leave out IN",
            )
        inputs[key] = open_checkpoint(resolve_model_reference(reference, recipe.path, f"models.{key}"))
    if not inputs:
        raise RecipeError(
            "the recipe names no models and no input checkpoint was given",
            path=recipe.path,
            field="models",
            fix="run `surgeon apply RECIPE IN OUT`, or list source models under `models:` in the recipe",
        )
    return inputs


def plan_recipe(
    recipe: str | Path | LoadedRecipe,
    input_path: str | Path | None,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Plan:
    """Compile a recipe against its inputs without writing anything."""
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    inputs = open_inputs(loaded, input_path)
    return compile_plan(loaded, inputs, max_shard_size=max_shard_size)


def apply_recipe(
    recipe: str | Path | LoadedRecipe,
    input_path: str | Path | None,
    output_path: str | Path,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    options: WriteOptions | None = None,
) -> Plan:
    """Plan the recipe and write the output checkpoint; return the plan that was written."""
    plan = plan_recipe(recipe, input_path, max_shard_size=max_shard_size)
    try:
        write_output(plan, output_path, options)
    finally:
        for checkpoint in plan.inputs.values():
            checkpoint.close()
    return plan


@dataclass
class CheckpointSummary:
    """What `surgeon inspect` reports about a checkpoint."""

    checkpoint: Checkpoint
    architecture: str
    num_layers: int
    layer_tensors: list[str]
    global_tensors: list[str]
    dtypes: dict[str, int]
    parameters: int
    total_size: int


def inspect_checkpoint(path: str | Path) -> CheckpointSummary:
    """Open and validate a checkpoint and summarise its layers, dtypes and size."""
    checkpoint = open_checkpoint(path)
    arch = detect_architecture(checkpoint.config, str(Path(path) / "config.json"))
    table = split_layers(arch, list(checkpoint.tensors), checkpoint.config, str(path))
    dtypes: dict[str, int] = {}
    for info in checkpoint.tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + info.numel
    return CheckpointSummary(
        checkpoint=checkpoint,
        architecture=arch.name,
        num_layers=len(table.layers),
        layer_tensors=table.layers[0],
        global_tensors=table.globals,
        dtypes=dtypes,
        parameters=checkpoint.parameter_count(),
        total_size=sum(info.nbytes for info in checkpoint.tensors.values()),
    )
