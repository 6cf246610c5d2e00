"""Compile a recipe and input headers into a Plan: every output tensor, shard and config field."""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from surgeon import __version__
from surgeon.architectures import Architecture, detect_architecture
from surgeon.checkpoint import Checkpoint
from surgeon.dtypes import FLOAT_DTYPES
from surgeon.errors import PlanError
from surgeon.plan.expressions import converted
from surgeon.plan.layout import ModelLayout, layout_from_checkpoint
from surgeon.plan.sharding import PlannedShard, PlannedTensor, assign_shards
from surgeon.plan.slices import layout_from_slices
from surgeon.plan.tokenizer_check import check_tokenizer_matches
from surgeon.plan.steps import STEP_FUNCTIONS
from surgeon.recipe import LoadedRecipe
from surgeon.recipe.loader import model_references

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
DEFAULT_MODEL = "input"

_TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass
class Plan:
    """Everything the writer needs, decided before a single tensor byte moves."""

    recipe: LoadedRecipe
    inputs: dict[str, Checkpoint]
    base_model: str
    layout: ModelLayout
    config: dict
    tensors: list[PlannedTensor]
    shards: list[PlannedShard]
    # The input whose tokenizer and other non-weight files are copied; the base model unless the recipe names another.
    tokenizer_model: str = DEFAULT_MODEL

    @property
    def total_size(self) -> int:
        """Bytes of tensor data, as `metadata.total_size` in the index counts them."""
        return sum(tensor.expr.nbytes for tensor in self.tensors)

    @property
    def output_bytes(self) -> int:
        """Bytes of all shard files, headers included."""
        return sum(shard.size for shard in self.shards)

    def parameter_count(self) -> int:
        return sum(tensor.expr.numel for tensor in self.tensors)

    def fingerprint(self) -> str:
        """Hash of every shard header and every tensor's source; equal plans write equal bytes."""
        digest = hashlib.sha256()
        for shard in self.shards:
            digest.update(shard.file_name.encode())
            digest.update(shard.header)
            for tensor in shard.tensors:
                digest.update(tensor.expr.describe().encode())
        for key, checkpoint in sorted(self.inputs.items()):
            digest.update(key.encode())
            digest.update(checkpoint.fingerprint().encode())
        return digest.hexdigest()

    def layer_map(self) -> list[dict[str, Any]]:
        return [{"index": index, **layer.origin.to_dict()} for index, layer in enumerate(self.layout.layers)]

    def manifest(self) -> dict[str, Any]:
        """Return the `surgeon.json` content: recipe, input fingerprints and every layer's origin."""
        return {
            "surgeon_version": __version__,
            "recipe": {"name": self.recipe.name, "format": self.recipe.source_format, "text": self.recipe.text},
            "base_model": self.base_model,
            "inputs": {
                key: {
                    "path": checkpoint.source or str(checkpoint.folder),
                    "fingerprint": checkpoint.fingerprint(),
                    "num_layers": checkpoint.config.get(self.layout.arch.num_layers_field),
                    "parameters": checkpoint.parameter_count(),
                }
                for key, checkpoint in self.inputs.items()
            },
            "output": {
                "architecture": self.layout.arch.name,
                "num_layers": len(self.layout.layers),
                "parameters": self.parameter_count(),
                "total_size": self.total_size,
                "plan_fingerprint": self.fingerprint(),
                "shards": [
                    {"file": shard.file_name, "size": shard.size, "header_sha256": hashlib.sha256(shard.header).hexdigest()}
                    for shard in self.shards
                ],
            },
            "layers": self.layer_map(),
        }


def recipe_base_model(recipe: LoadedRecipe, default: str = DEFAULT_MODEL) -> str:
    """Return the key of the model whose config, tokenizer and side files the output takes."""
    if recipe.recipe.base_model is not None:
        return recipe.recipe.base_model
    if recipe.recipe.slices:
        return recipe.recipe.slices[0].model
    return default


def initial_layout(recipe: LoadedRecipe, inputs: dict[str, Checkpoint], base_model: str) -> ModelLayout:
    """Return the layout the steps start from: the recipe's slices, or else the unchanged base model."""
    checkpoint = inputs[base_model]
    override = recipe.recipe.architecture
    arch = detect_architecture(checkpoint.config, str(checkpoint.folder / "config.json"), override.layer_prefix if override else None)
    if override:
        arch = Architecture(
            name=arch.name, model_types=arch.model_types, layer_prefix=override.layer_prefix,
            output_projections=tuple(override.output_projections),
        )
    if recipe.recipe.slices:
        return layout_from_slices(
            recipe.recipe,
            inputs,
            base_model,
            arch,
            slice_fields=recipe.extras.get("slice_fields"),
            require_filter_matches=recipe.source_format == "surgeon",
        )
    return layout_from_checkpoint(base_model, checkpoint, arch)


def output_config(layout: ModelLayout, dtype: str | None) -> dict:
    """Return config.json for the output: the input's keys and values, with layer fields updated."""
    config = copy.deepcopy(layout.config)
    arch = layout.arch
    count = len(layout.layers)
    config[arch.num_layers_field] = count

    for field_name in arch.per_layer_fields:
        values = [layer.config_values.get(field_name) for layer in layout.layers]
        if field_name in config:
            config[field_name] = values
        elif field_name == "layer_types" and arch.default_layer_types and values != arch.default_layer_types(config, count):
            config[field_name] = values

    if dtype is not None:
        name = _TORCH_DTYPE_NAMES[dtype]
        keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
        for key in keys:
            config[key] = name
    return config


def compile_plan(
    recipe: LoadedRecipe,
    inputs: dict[str, Checkpoint],
    *,
    base_model: str = DEFAULT_MODEL,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> Plan:
    """Apply the recipe's steps to the base model's layout and place every tensor in a shard.

    A recipe that names its base model (or has slices) overrides `base_model`.
    """
    base_model = recipe_base_model(recipe, base_model)
    missing = [key for _, key in model_references(recipe.recipe) if key not in inputs]
    if base_model not in inputs or missing:
        key = missing[0] if missing else base_model
        raise PlanError(
            f"model {key!r} is not among the inputs {sorted(inputs)}",
            path=recipe.path,
            value=key,
            fix="pass the input checkpoint on the command line (`surgeon apply RECIPE IN OUT`), or name the model under `models:`",
        )
    layout = initial_layout(recipe, inputs, base_model)
    for index, (kind, options) in enumerate(recipe.steps):
        count_before = len(layout.layers)
        dense_layers = layout.config.get("mlp_only_layers")
        layout = STEP_FUNCTIONS[kind](layout, options, index)
        logger.debug("after step %d (%s): %d layers", index, kind, len(layout.layers))
        if dense_layers and len(layout.layers) != count_before:
            # NOTE: mlp_only_layers contains layer indices, which a step that adds or removes layers would invalidate.
            raise PlanError(
                f"step {kind!r} changes the layer count of a model whose layers {dense_layers} stay dense (mlp_only_layers)",
                field=f"steps[{index}]",
                fix="put the moe step after every step that adds or removes layers, or make every layer sparse",
            )

    dtype = recipe.recipe.dtype
    named = layout.tensors()
    if dtype is not None:
        named = [(name, converted(expr, dtype) if expr.dtype in FLOAT_DTYPES else expr) for name, expr in named]

    seen: set[str] = set()
    for name, _ in named:
        if name in seen:
            raise PlanError(f"the plan writes tensor {name} twice", tensor=name, fix="check the recipe's steps for overlapping outputs")
        seen.add(name)

    tensors = [PlannedTensor(name, expr) for name, expr in named]
    if max_shard_size <= 0:
        raise PlanError(f"max shard size must be positive, got {max_shard_size}", field="max_shard_size", fix="pass e.g. --max-shard-size 5GB")
    shards = assign_shards(tensors, max_shard_size)
    tokenizer_model = recipe.recipe.tokenizer_model or base_model
    embeddings_model = recipe.recipe.embeddings.model if recipe.recipe.embeddings else base_model
    check_tokenizer_matches(inputs, tokenizer_model, embeddings_model)
    return Plan(recipe, inputs, base_model, layout, output_config(layout, dtype), tensors, shards, tokenizer_model=tokenizer_model)
