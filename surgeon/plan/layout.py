"""The model layout that recipe steps transform: decoder layers plus global tensors.

Steps such as TLI or DUS only reorder, copy and re-initialise whole layers, so
they work on this layout and never on flat tensor lists. Each layer keeps its
tensors as expressions keyed by name suffix (`self_attn.o_proj.weight`), its
per-layer config values, and a record of where it came from.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from surgeon.architectures import Architecture, per_layer_values, split_layers
from surgeon.checkpoint import Checkpoint
from surgeon.errors import PlanError
from surgeon.plan.expressions import InputTensor, TensorExpr


@dataclass
class LayerOrigin:
    """Origin of an output layer, as recorded in `surgeon.json`."""

    source_model: str
    source_layer: int
    new: bool = False
    init: str = "copy"

    def to_dict(self) -> dict[str, Any]:
        return {"source_model": self.source_model, "source_layer": self.source_layer, "new": self.new, "init": self.init}


@dataclass
class Layer:
    """One decoder layer of the output: tensor expressions, per-layer config values and origin."""

    tensors: dict[str, TensorExpr]
    config_values: dict[str, Any]
    origin: LayerOrigin

    def clone(self) -> "Layer":
        return Layer(dict(self.tensors), dict(self.config_values), copy.copy(self.origin))


@dataclass
class ModelLayout:
    """The output model before byte placement: global tensors, layers and base config."""

    arch: Architecture
    config: dict
    layers: list[Layer]
    globals_before: dict[str, TensorExpr] = field(default_factory=dict)
    globals_after: dict[str, TensorExpr] = field(default_factory=dict)

    def tensor_names(self) -> list[str]:
        names = list(self.globals_before)
        for index, layer in enumerate(self.layers):
            names.extend(self.arch.layer_name(index, suffix) for suffix in layer.tensors)
        names.extend(self.globals_after)
        return names

    def tensors(self) -> list[tuple[str, TensorExpr]]:
        """Return every output tensor with its final name, in file order."""
        items = list(self.globals_before.items())
        for index, layer in enumerate(self.layers):
            items.extend((self.arch.layer_name(index, suffix), expr) for suffix, expr in layer.tensors.items())
        items.extend(self.globals_after.items())
        return items


def layout_from_checkpoint(model: str, checkpoint: Checkpoint, arch: Architecture) -> ModelLayout:
    """Describe an input checkpoint as a layout whose every tensor is an unchanged copy."""
    names = list(checkpoint.tensors)
    table = split_layers(arch, names, checkpoint.config, str(checkpoint.folder))
    per_layer = per_layer_values(arch, checkpoint.config, len(table.layers))

    layers = []
    for index, suffixes in enumerate(table.layers):
        tensors = {
            suffix: InputTensor(checkpoint, model, checkpoint.tensors[arch.layer_name(index, suffix)]) for suffix in suffixes
        }
        config_values = {name: values[index] for name, values in per_layer.items()}
        layers.append(Layer(tensors, config_values, LayerOrigin(model, index)))

    globals_before: dict[str, TensorExpr] = {}
    globals_after: dict[str, TensorExpr] = {}
    for name in table.globals:
        target = globals_before if "embed" in name else globals_after
        target[name] = InputTensor(checkpoint, model, checkpoint.tensors[name])
    return ModelLayout(arch, dict(checkpoint.config), layers, globals_before, globals_after)


def suffix_matches(suffix: str, pattern: str) -> bool:
    """Match a tensor suffix against a recipe pattern; `mlp.down_proj` also matches its `.weight` and `.bias`."""
    return fnmatch.fnmatchcase(suffix, pattern) or fnmatch.fnmatchcase(suffix, pattern + ".*")


def check_patterns_match(step_kind: str, field_name: str, patterns: list[str], suffixes: list[str], step_index: int, layer_index: int) -> None:
    """Reject a tensor pattern that selects nothing: a typo there would silently change what the new layer does."""
    unmatched = [pattern for pattern in patterns if not any(suffix_matches(suffix, pattern) for suffix in suffixes)]
    if unmatched:
        raise PlanError(
            f"{step_kind}: {field_name} pattern(s) {unmatched} match no tensor of layer {layer_index}",
            field=f"steps[{step_index}].{step_kind}.{field_name}",
            value=unmatched,
            fix="use tensor name suffixes such as 'self_attn.o_proj' (see `surgeon inspect IN`)",
        )
