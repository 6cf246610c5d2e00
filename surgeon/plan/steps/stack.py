"""G_stack depth growth (arXiv 2405.15319): the whole layer stack repeated `times` times."""

from __future__ import annotations

from surgeon.plan.layout import LayerOrigin, ModelLayout
from surgeon.recipe.schema import StackStep


def apply_stack(layout: ModelLayout, step: StackStep, step_index: int) -> ModelLayout:
    """Return the layers followed by `times - 1` byte copies of themselves."""
    layers = list(layout.layers)
    for repeat in range(1, step.times):
        for index, layer in enumerate(layout.layers):
            copy = layer.clone()
            copy.origin = LayerOrigin(
                layer.origin.source_model, layer.origin.source_layer, new=True, init=f"copy of layer {index} (stack repeat {repeat + 1})"
            )
            layers.append(copy)
    return ModelLayout(layout.arch, layout.config, layers, layout.globals_before, layout.globals_after)
