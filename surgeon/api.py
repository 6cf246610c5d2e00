"""The Python API behind the CLI: plan, apply and inspect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgeon.architectures import detect_architecture, split_layers
from surgeon.checkpoint import Checkpoint
from surgeon.errors import RecipeError
from surgeon.hub import HUB_SCHEME, check_push_target, open_model_reference, parse_hub_reference, push_to_hub
from surgeon.plan import DEFAULT_MAX_SHARD_SIZE, DEFAULT_MODEL, Plan, compile_plan
from surgeon.recipe import LoadedRecipe, load_recipe
from surgeon.streamed_inputs import StreamedInputs
from surgeon.writer import WriteOptions, write_output


def open_model_input(key: str, reference: str | Path, stream: StreamedInputs | None = None) -> Checkpoint:
    """Open a local folder or `hf://ORG/NAME[@REVISION]`. With `stream`, a Hub input is fetched shard by shard."""
    hub_reference = parse_hub_reference(reference)
    if stream is not None and hub_reference is not None:
        return stream.open(key, hub_reference)
    return open_model_reference(reference)


def resolve_model_reference(reference: str, recipe_path: str, field: str) -> str | Path:
    """Return what a recipe's model reference names: an `hf://` reference as it is, or a local folder.

    A relative path resolves against the recipe file's folder first and, when
    nothing exists there, against the current directory.
    """
    if parse_hub_reference(reference) is not None:
        return reference
    if "://" in reference:
        raise RecipeError(
            f"model reference {reference!r} uses a scheme surgeon does not read",
            path=recipe_path,
            field=field,
            value=reference,
            fix=f"give a local folder path or {HUB_SCHEME}ORG/NAME[@REVISION]",
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


def open_inputs(recipe: LoadedRecipe, input_path: str | Path | None, stream: StreamedInputs | None = None) -> dict[str, Checkpoint]:
    """Open the command-line input as model `input`, plus the models the recipe names under `models:`."""
    inputs: dict[str, Checkpoint] = {}
    if input_path is not None:
        inputs[DEFAULT_MODEL] = open_model_input(DEFAULT_MODEL, input_path, stream)
    for key, reference in recipe.recipe.models.items():
        if key == DEFAULT_MODEL and input_path is not None:
            raise RecipeError(
                f"the recipe names a model {DEFAULT_MODEL!r}, which is also the key of the command-line input",
                path=recipe.path,
                field=f"models.{key}",
                fix="rename the model in the recipe, or leave out IN",
            )
        inputs[key] = open_model_input(key, resolve_model_reference(reference, recipe.path, f"models.{key}"), stream)
    if not inputs:
        raise RecipeError(
            "the recipe names no models and no input checkpoint was given",
            path=recipe.path,
            field="models",
            fix="run `surgeon apply RECIPE IN OUT`, or list source models under `models:` in the recipe",
        )
    return inputs


def hub_base_model_ids(plan: Plan) -> list[str]:
    """Return the Hub repository ids of the plan's inputs, base model first, for the model card."""
    ids: list[str] = []
    for key in [plan.base_model, *sorted(plan.inputs)]:
        reference = parse_hub_reference(plan.inputs[key].source or "")
        if reference is not None and reference.repo_id not in ids:
            ids.append(reference.repo_id)
    return ids


def check_every_input_used(plan: Plan) -> None:
    """Reject an input the plan never reads: it would be recorded in surgeon.json as a source all the same."""
    used = {plan.base_model, plan.tokenizer_model}
    for tensor in plan.tensors:
        used.update(shard.model for shard in tensor.expr.input_shards())
    unused = sorted(set(plan.inputs) - used)
    if unused:
        raise RecipeError(
            f"input model(s) {unused} are not used by this recipe",
            path=plan.recipe.path,
            value=unused,
            fix="leave IN out when the recipe names its own models" if unused == [DEFAULT_MODEL] else "remove the unused models from `models:`",
        )


def plan_recipe(
    recipe: str | Path | LoadedRecipe,
    input_path: str | Path | None,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    stream: StreamedInputs | None = None,
) -> Plan:
    """Compile a recipe against its inputs without writing anything.

    With `stream`, Hub inputs are opened from their shard headers alone, and
    `stream.predicted_peak_bytes` is set from the plan.
    """
    loaded = recipe if isinstance(recipe, LoadedRecipe) else load_recipe(recipe)
    inputs = open_inputs(loaded, input_path, stream)
    plan = compile_plan(loaded, inputs, max_shard_size=max_shard_size)
    check_every_input_used(plan)
    if stream is not None:
        stream.prepare(plan)
    return plan


def apply_recipe(
    recipe: str | Path | LoadedRecipe,
    input_path: str | Path | None,
    output_path: str | Path,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    options: WriteOptions | None = None,
    stream: StreamedInputs | None = None,
) -> Plan:
    """Plan the recipe and write the output checkpoint; return the plan that was written.

    With `stream` (see `StreamedInputs.for_output`), Hub inputs are downloaded
    one shard at a time and deleted after their last use.
    """
    options = options or WriteOptions()
    try:
        plan = plan_recipe(recipe, input_path, max_shard_size=max_shard_size, stream=stream)
        options.input_stream = stream
        if options.base_model_ids is None:
            options.base_model_ids = hub_base_model_ids(plan) or None
        try:
            write_output(plan, output_path, options)
        finally:
            for checkpoint in plan.inputs.values():
                checkpoint.close()
    finally:
        if stream is not None:
            stream.close()
    return plan


def push_output(folder: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Check a written output folder and upload it to the Hub repository `repo_id`; return the commit URL."""
    return push_to_hub(folder, _strip_hub_scheme(repo_id), private=private)


def check_push_repo(repo_id: str) -> None:
    """Fail before writing anything when `repo_id` could not be pushed to."""
    check_push_target(_strip_hub_scheme(repo_id))


def _strip_hub_scheme(repo_id: str) -> str:
    return repo_id[len(HUB_SCHEME) :] if repo_id.startswith(HUB_SCHEME) else repo_id


@dataclass
class CheckpointSummary:
    """Summary of a checkpoint, as `surgeon inspect` prints it."""

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
    checkpoint = open_model_reference(path)
    arch = detect_architecture(checkpoint.config, str(checkpoint.folder / "config.json"))
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
