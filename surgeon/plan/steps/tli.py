"""Transformer Layer Injection (arXiv 2410.11654).

After every group of `every` layers a new layer is inserted. By default it
copies a neighbouring layer and zeroes the tensors that write into the
residual stream (attention `o_proj`, MLP `down_proj`), so the new layer adds
nothing to the residual and the model's outputs are unchanged.
"""

from __future__ import annotations

import logging

from surgeon.errors import PlanError
from surgeon.plan.expressions import Mean, WithNoise, Zeros, derive_seed, scaled
from surgeon.plan.layout import Layer, LayerOrigin, ModelLayout, check_patterns_match, suffix_matches
from surgeon.recipe.schema import TLIStep

logger = logging.getLogger(__name__)


def apply_tli(layout: ModelLayout, step: TLIStep, step_index: int) -> ModelLayout:
    """Return the layout with one new layer per group of `step.every` layers."""
    count = len(layout.layers)
    groups = [list(range(start, min(start + step.every, count))) for start in range(0, count, step.every)]
    if groups and len(groups[-1]) < step.every and step.remainder == "skip":
        skipped = groups.pop()
        logger.info("tli: last group %s is partial (%d of %d layers); no layer inserted", skipped, len(skipped), step.every)
    if not groups:
        raise PlanError(
            f"tli inserts no layer: every = {step.every} is more than the {count} layers and remainder is 'skip'",
            field=f"steps[{step_index}].tli.every",
            value=step.every,
            fix=f"use every <= {count}, or remainder: insert",
        )

    new_layers: list[Layer] = []
    position = 0
    for group in groups:
        if step.position == "before_group":
            previous_index, next_index = group[0] - 1, group[0]
        else:
            previous_index, next_index = group[-1], group[-1] + 1
        while position < group[0]:
            new_layers.append(layout.layers[position])
            position += 1
        if step.position == "after_group":
            new_layers.extend(layout.layers[position : group[-1] + 1])
            position = group[-1] + 1
        new_layers.append(_make_layer(layout, step, step_index, previous_index, next_index, len(new_layers)))
    new_layers.extend(layout.layers[position:])

    return ModelLayout(layout.arch, layout.config, new_layers, layout.globals_before, layout.globals_after)


def _make_layer(layout: ModelLayout, step: TLIStep, step_index: int, previous_index: int, next_index: int, output_index: int) -> Layer:
    count = len(layout.layers)
    has_previous, has_next = previous_index >= 0, next_index < count
    mode = step.copy_from
    if mode == "mean" and not (has_previous and has_next):
        mode = "previous" if has_previous else "next"
    elif mode == "next" and not has_next:
        mode = "previous"
    elif mode == "previous" and not has_previous:
        mode = "next"

    if mode == "mean":
        previous, following = layout.layers[previous_index], layout.layers[next_index]
        if set(previous.tensors) != set(following.tensors):
            raise PlanError(f"tli: cannot average layers {previous_index} and {next_index} because their tensor sets differ")
        tensors = {suffix: Mean([expr, following.tensors[suffix]]) for suffix, expr in previous.tensors.items()}
        base = previous
        init = f"mean of output layers {previous_index} and {next_index}"
    else:
        base = layout.layers[previous_index if mode == "previous" else next_index]
        tensors = dict(base.tensors)
        init = f"copy of layer {previous_index if mode == 'previous' else next_index}"

    zero_patterns = step.zero if step.zero is not None else list(layout.arch.output_projections)
    zeroed = []
    for suffix, expr in tensors.items():
        if any(suffix_matches(suffix, pattern) for pattern in zero_patterns):
            tensors[suffix] = Zeros(expr.dtype, expr.shape)
            zeroed.append(suffix)
            continue
        for pattern, factor in step.scale.items():
            if suffix_matches(suffix, pattern):
                tensors[suffix] = scaled(tensors[suffix], factor)
        if step.noise and any(suffix_matches(suffix, pattern) for pattern in step.noise.tensors):
            seed = derive_seed(step.noise.seed, f"step{step_index}:{layout.arch.layer_name(output_index, suffix)}")
            tensors[suffix] = WithNoise(tensors[suffix], step.noise.std, seed)

    patterns = {"zero": zero_patterns, "scale": list(step.scale), "noise.tensors": step.noise.tensors if step.noise else []}
    for field_name, field_patterns in patterns.items():
        check_patterns_match("tli", field_name, field_patterns, list(tensors), step_index, previous_index if mode != "next" else next_index)
    if zeroed:
        init += ", zeroed " + ", ".join(zeroed)
    if step.scale:
        init += ", scaled " + ", ".join(f"{pattern}x{factor:g}" for pattern, factor in step.scale.items())
    if step.noise:
        init += f", noise std={step.noise.std:g} seed={step.noise.seed}"

    origin = LayerOrigin(base.origin.source_model, base.origin.source_layer, new=True, init=init)
    return Layer(tensors, dict(base.config_values), origin)

