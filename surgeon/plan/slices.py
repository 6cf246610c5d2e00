"""Build a layout from a recipe's `slices:`: layer ranges taken from one or more source models.

Each slice contributes layers [start, end) of one model, in order, with its
scale filters applied. The tensors outside the decoder layers come from the
models that `embeddings:` and `head:` name (both default to the base model).
Every source model must agree on what a layer depends on, so that any layer
fits into the output's config.
"""

from __future__ import annotations

import logging

from surgeon.architectures import Architecture
from surgeon.checkpoint import Checkpoint
from surgeon.dtypes import FLOAT_DTYPES
from surgeon.errors import PlanError
from surgeon.plan.expressions import TensorExpr, converted, scaled
from surgeon.plan.layout import Layer, ModelLayout, layout_from_checkpoint, suffix_matches
from surgeon.recipe.schema import Recipe, TensorFilter

logger = logging.getLogger(__name__)

# Config fields a decoder layer's shapes and meaning depend on; every source model must match the base model.
LAYER_CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)


def check_compatible(inputs: dict[str, Checkpoint], keys: list[str], base_model: str) -> None:
    """Raise PlanError naming both values when a source model's layer config differs from the base model's."""
    base = inputs[base_model].config
    for key in keys:
        config = inputs[key].config
        for field_name in LAYER_CONFIG_FIELDS:
            if config.get(field_name) != base.get(field_name):
                raise PlanError(
                    f"models {base_model!r} and {key!r} differ in {field_name}: "
                    f"{base.get(field_name)!r} in {base_model!r}, {config.get(field_name)!r} in {key!r}",
                    path=f"{inputs[key].folder}/config.json",
                    field=field_name,
                    value=config.get(field_name),
                    fix="slice only models of one architecture and size, such as fine-tunes of one base model",
                )


def first_match(filters: list[TensorFilter], suffix: str, full_name: str) -> int | None:
    """Return the index of the first filter that selects a tensor, or None."""
    for position, candidate in enumerate(filters):
        if candidate.name_contains is not None:
            if candidate.name_contains in full_name:
                return position
        elif candidate.tensors is None or suffix_matches(suffix, candidate.tensors):
            return position
    return None


def apply_filters(
    tensors: dict[str, TensorExpr],
    full_names: dict[str, str],
    filters: list[TensorFilter],
    dtype: str | None,
    used: set[int],
) -> dict[str, TensorExpr]:
    """Scale each tensor by its first matching filter, adding the indices of the filters used to `used`.

    With a recipe dtype, a tensor is rounded to that dtype before a scale other
    than 0 or 1, as mergekit computes in its `dtype`.
    """
    result = {}
    for key, expr in tensors.items():
        position = first_match(filters, key, full_names[key])
        if position is None:
            result[key] = expr
            continue
        used.add(position)
        factor = filters[position].scale
        if dtype is not None and factor not in (0, 1) and expr.dtype in FLOAT_DTYPES:
            expr = converted(expr, dtype)
        result[key] = scaled(expr, factor)
    return result


def check_filters_used(filters: list[TensorFilter], used: set[int], field: str) -> None:
    """Reject a filter that selected no tensor, since a typo in it would otherwise change nothing."""
    for position, candidate in enumerate(filters):
        if position not in used:
            selector = candidate.tensors if candidate.tensors is not None else candidate.name_contains
            raise PlanError(
                f"filter {selector!r} selects no tensor",
                field=f"{field}[{position}]",
                value=selector,
                fix="use tensor name suffixes such as 'self_attn.o_proj' (see `surgeon inspect IN`), or remove the filter",
            )


def layout_from_slices(
    recipe: Recipe,
    inputs: dict[str, Checkpoint],
    base_model: str,
    arch: Architecture,
    slice_fields: list[dict[str, str]] | None = None,
    require_filter_matches: bool = True,
) -> ModelLayout:
    """Return the layout the `slices:` section describes.

    `slice_fields` gives, per slice, the recipe field names that errors report
    for its `layers`, `model` and `filters` (a translated mergekit config has
    its own names).
    """
    slices = recipe.slices or []
    if slice_fields is None:
        slice_fields = [{part: f"slices[{index}].{part}" for part in ("layers", "model", "filters")} for index in range(len(slices))]
    embeddings_model = recipe.embeddings.model if recipe.embeddings else base_model
    head_model = recipe.head.model if recipe.head else base_model
    keys = list(dict.fromkeys([base_model, embeddings_model, head_model] + [layer_slice.model for layer_slice in slices]))
    check_compatible(inputs, keys, base_model)
    sources = {key: layout_from_checkpoint(key, inputs[key], arch) for key in keys}
    reference = _layer_signature(sources[base_model].layers[0])

    layers: list[Layer] = []
    for layer_slice, field in zip(slices, slice_fields):
        source = sources[layer_slice.model]
        start, end = layer_slice.layers
        if end > len(source.layers):
            raise PlanError(
                f"layer range [{start}, {end}) goes past the last layer of model {layer_slice.model!r}, "
                f"which has {len(source.layers)} layers (0..{len(source.layers) - 1}); the end is exclusive",
                path=str(inputs[layer_slice.model].folder),
                field=field["layers"],
                value=[start, end],
                fix=f"end the range at {len(source.layers)} or less",
            )
        if _layer_signature(source.layers[start]) != reference:
            raise PlanError(
                f"model {layer_slice.model!r} has layers with other tensor names or shapes than model {base_model!r}",
                path=str(inputs[layer_slice.model].folder),
                field=field["model"],
                value=layer_slice.model,
                fix="slice only models of one architecture and size",
            )

        used: set[int] = set()
        for index in range(start, end):
            layer = source.layers[index].clone()
            full_names = {suffix: arch.layer_name(index, suffix) for suffix in layer.tensors}
            layer.tensors = apply_filters(layer.tensors, full_names, layer_slice.filters, recipe.dtype, used)
            layers.append(layer)
        if require_filter_matches:
            check_filters_used(layer_slice.filters, used, field["filters"])

    globals_before = _global_tensors(sources[embeddings_model].globals_before, recipe.embeddings, recipe.dtype, "embeddings", require_filter_matches)
    globals_after = _global_tensors(sources[head_model].globals_after, recipe.head, recipe.dtype, "head", require_filter_matches)
    logger.info("slices: %d layers from %s", len(layers), ", ".join(f"{s.model}{list(s.layers)}" for s in slices))
    return ModelLayout(arch, dict(inputs[base_model].config), layers, globals_before, globals_after)


def _layer_signature(layer: Layer) -> dict[str, tuple]:
    return {suffix: expr.shape for suffix, expr in layer.tensors.items()}


def _global_tensors(tensors: dict[str, TensorExpr], source, dtype: str | None, field: str, required: bool) -> dict[str, TensorExpr]:
    if source is None or not source.filters:
        return dict(tensors)
    used: set[int] = set()
    result = apply_filters(tensors, {name: name for name in tensors}, source.filters, dtype, used)
    if required:
        check_filters_used(source.filters, used, f"{field}.filters")
    return result
