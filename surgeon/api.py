"""The Python API behind the CLI: plan, apply and inspect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from surgeon.architectures import detect_architecture, split_layers
from surgeon.checkpoint import Checkpoint, open_checkpoint
from surgeon.plan import DEFAULT_MAX_SHARD_SIZE, DEFAULT_MODEL, Plan, compile_plan
from surgeon.recipe import LoadedRecipe, load_recipe
from surgeon.writer import WriteOptions, write_output


def open_inputs(recipe: LoadedRecipe, input_path: str | Path | None) -> dict[str, Checkpoint]:
    """Open the command-line input as model `input`, plus any models the recipe names."""
    inputs: dict[str, Checkpoint] = {}
    if input_path is not None:
        inputs[DEFAULT_MODEL] = open_checkpoint(input_path)
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
