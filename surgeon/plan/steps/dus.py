"""Depth Up-Scaling, as SOLAR 10.7B built it (arXiv 2312.15166).

Two copies of the layer stack are joined: the first drops its last `overlap`
layers and the second drops its first `overlap` layers. A 32-layer model with
overlap 8 becomes layers 0..23 followed by layers 8..31, 48 layers in all.
"""

from __future__ import annotations

from surgeon.errors import PlanError
from surgeon.plan.layout import Layer, LayerOrigin, ModelLayout
from surgeon.recipe.schema import DUSStep


def apply_dus(layout: ModelLayout, step: DUSStep, step_index: int) -> ModelLayout:
    """Return layers [0, n - overlap) followed by byte copies of layers [overlap, n)."""
    count = len(layout.layers)
    if 2 * step.overlap > count:
        raise PlanError(
            f"dus: overlap {step.overlap} is more than half of the {count} layers, "
            f"so layers {count - step.overlap}..{step.overlap - 1} would be dropped",
            field=f"steps[{step_index}].dus.overlap",
            value=step.overlap,
            fix=f"use an overlap of at most {count // 2}, or a `slices:` section to drop layers on purpose",
        )

    first = layout.layers[: count - step.overlap]
    second = []
    for index in range(step.overlap, count):
        layer = layout.layers[index]
        if index < count - step.overlap:
            layer = _duplicate(layer, index)
        second.append(layer)
    return ModelLayout(layout.arch, layout.config, first + second, layout.globals_before, layout.globals_after)


def _duplicate(layer: Layer, index: int) -> Layer:
    copy = layer.clone()
    copy.origin = LayerOrigin(layer.origin.source_model, layer.origin.source_layer, new=True, init=f"copy of layer {index} (DUS)")
    return copy
