"""Block expansion: new identity layers spread evenly over a span of layers.

LLaMA Pro (arXiv 2401.02415) splits the n layers into `blocks` groups and adds
a copy of each group's last layer on top of it, with the output projections
(`o_proj`, `down_proj`) zeroed so the model's outputs are unchanged. Llama
SLayer (arXiv 2410.02330) does the same within the shallow half of the layers,
initialising each new layer as the mean of the layers before and after it.
"""

from __future__ import annotations

import math

from surgeon.errors import PlanError
from surgeon.plan.expressions import Mean, Zeros
from surgeon.plan.layout import Layer, LayerOrigin, ModelLayout, check_patterns_match, suffix_matches
from surgeon.recipe.schema import BlockExpansionStep


def insertion_points(count: int, step: BlockExpansionStep, step_index: int = 0) -> list[int]:
    """Return the layer indices after which a new layer goes: the last layer of each group."""
    start = math.floor(step.span[0] * count)
    end = math.floor(step.span[1] * count)
    length = end - start
    if step.blocks > length:
        raise PlanError(
            f"block_expansion: {step.blocks} blocks do not fit in the {length} layers of span {list(step.span)} "
            f"(layers {start}..{end - 1} of {count})",
            field=f"steps[{step_index}].block_expansion.blocks",
            value=step.blocks,
            fix=f"use at most {length} blocks, or widen the span",
        )
    return [start + (group + 1) * length // step.blocks - 1 for group in range(step.blocks)]


def apply_block_expansion(layout: ModelLayout, step: BlockExpansionStep, step_index: int) -> ModelLayout:
    """Return the layout with one identity layer after the last layer of each group."""
    points = set(insertion_points(len(layout.layers), step, step_index))
    zero_patterns = step.zero if step.zero is not None else list(layout.arch.output_projections)

    layers: list[Layer] = []
    for index, layer in enumerate(layout.layers):
        layers.append(layer)
        if index in points:
            layers.append(_new_layer(layout, index, step.copy_from, zero_patterns, step_index))
    return ModelLayout(layout.arch, layout.config, layers, layout.globals_before, layout.globals_after)


def _new_layer(layout: ModelLayout, index: int, copy_from: str, zero_patterns: list[str], step_index: int) -> Layer:
    base = layout.layers[index]
    has_next = index + 1 < len(layout.layers)
    if copy_from == "mean" and has_next:
        following = layout.layers[index + 1]
        tensors = {suffix: Mean([expr, following.tensors[suffix]]) for suffix, expr in base.tensors.items()}
        init = f"mean of layers {index} and {index + 1}"
    else:
        tensors = dict(base.tensors)
        init = f"copy of layer {index}"

    check_patterns_match("block_expansion", "zero", zero_patterns, list(tensors), step_index, index)
    zeroed = [suffix for suffix in tensors if any(suffix_matches(suffix, pattern) for pattern in zero_patterns)]
    for suffix in zeroed:
        tensors[suffix] = Zeros(tensors[suffix].dtype, tensors[suffix].shape)
    if zeroed:
        init += ", zeroed " + ", ".join(zeroed)

    origin = LayerOrigin(base.origin.source_model, base.origin.source_layer, new=True, init=init)
    return Layer(tensors, dict(base.config_values), origin)
