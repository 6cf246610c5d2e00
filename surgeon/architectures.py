"""Data tables for the decoder architectures surgeon understands.

Each entry names where a decoder layer's tensors live (`{}` is the layer
index), which tensors write into the residual stream (zeroing them turns a
layer into an identity), and which config fields hold one value per layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from surgeon.errors import ArchitectureError, ConfigError, CheckpointError

LayerTypesRule = Callable[[dict, int], list]


def _gemma2_layer_types(config: dict, count: int) -> list:
    return ["sliding_attention" if (index + 1) % 2 else "full_attention" for index in range(count)]


def _gemma3_layer_types(config: dict, count: int) -> list:
    pattern = config.get("sliding_window_pattern", 6)
    return ["sliding_attention" if (index + 1) % pattern else "full_attention" for index in range(count)]


def _qwen_layer_types(config: dict, count: int) -> list:
    sliding = config.get("use_sliding_window") and config.get("sliding_window") is not None
    threshold = config.get("max_window_layers", count)
    return ["sliding_attention" if sliding and index >= threshold else "full_attention" for index in range(count)]


@dataclass(frozen=True)
class Architecture:
    """How one model family lays out its decoder layers and per-layer config."""

    name: str
    model_types: tuple[str, ...]
    layer_prefix: str = "model.layers.{}."
    output_projections: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    # Rule transformers applies when config.json has no explicit `layer_types`; surgeon
    # writes the list out so inserted layers cannot shift the pattern.
    default_layer_types: LayerTypesRule | None = None
    mlp_projections: dict[str, str] = field(
        default_factory=lambda: {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    )
    num_layers_field: str = "num_hidden_layers"

    def layer_name(self, index: int, suffix: str) -> str:
        return self.layer_prefix.format(index) + suffix

    def layer_pattern(self) -> re.Pattern:
        before, after = self.layer_prefix.split("{}")
        return re.compile(re.escape(before) + r"(\d+)" + re.escape(after) + r"(.+)")


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("llama", ("llama",)),
        Architecture("mistral", ("mistral",)),
        Architecture("qwen2", ("qwen2",), default_layer_types=_qwen_layer_types),
        Architecture("qwen3", ("qwen3",), default_layer_types=_qwen_layer_types),
        Architecture("gemma2", ("gemma2",), default_layer_types=_gemma2_layer_types),
        Architecture("gemma3_text", ("gemma3_text",), default_layer_types=_gemma3_layer_types),
        Architecture("phi3", ("phi3",), mlp_projections={"gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}),
    )
}


def supported_model_types() -> list[str]:
    return sorted(model_type for arch in ARCHITECTURES.values() for model_type in arch.model_types)


def detect_architecture(config: dict, config_path: str, layer_prefix: str | None = None) -> Architecture:
    """Return the architecture for a config, or a custom one when the recipe names the layer prefix."""
    model_type = config.get("model_type")
    if layer_prefix is not None:
        return Architecture(name=f"custom:{model_type}", model_types=(str(model_type),), layer_prefix=layer_prefix)
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    raise ArchitectureError(
        f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}",
        path=config_path,
        field="model_type",
        value=model_type,
        fix="add `architecture: {layer_prefix: 'model.layers.{}.', output_projections: [...]}` to the recipe "
        "to name the layer pattern yourself",
    )


@dataclass
class LayerTable:
    """The checkpoint's tensors split into decoder layers and everything else."""

    layers: list[list[str]]  # per layer index, the tensor name suffixes in file order
    globals: list[str]  # names outside any decoder layer, in file order


def split_layers(arch: Architecture, tensor_names: list[str], config: dict, source: str) -> LayerTable:
    """Group tensor names by decoder layer and check them against config.json."""
    pattern = arch.layer_pattern()
    by_layer: dict[int, list[str]] = {}
    global_names: list[str] = []
    for name in tensor_names:
        match = pattern.fullmatch(name)
        if match:
            by_layer.setdefault(int(match.group(1)), []).append(match.group(2))
        else:
            global_names.append(name)

    count = len(by_layer)
    if sorted(by_layer) != list(range(count)):
        missing = sorted(set(range(max(by_layer, default=-1) + 1)) - set(by_layer))
        raise CheckpointError(
            f"decoder layers are not numbered 0..{count - 1}: layers {missing} have no tensors",
            path=source,
            fix="the checkpoint is incomplete; download the missing shards",
        )
    if count == 0:
        raise ArchitectureError(
            f"no tensor matches the layer prefix {arch.layer_prefix!r}",
            path=source,
            value=arch.layer_prefix,
            fix="set `architecture.layer_prefix` in the recipe to the prefix your checkpoint uses",
        )

    declared = config.get(arch.num_layers_field)
    if declared != count:
        raise ConfigError(
            f"config says {arch.num_layers_field} = {declared}, but the tensors have {count} layers",
            path=f"{source}/config.json",
            field=arch.num_layers_field,
            value=declared,
            fix=f"set {arch.num_layers_field} to {count}, or restore the missing layer tensors",
        )

    reference = set(by_layer[0])
    for index in range(1, count):
        suffixes = set(by_layer[index])
        if suffixes != reference:
            missing = sorted(reference - suffixes) or sorted(suffixes - reference)
            raise CheckpointError(
                f"layer {index} has a different tensor set from layer 0 (differs in {missing})",
                path=source,
                tensor=arch.layer_name(index, missing[0]),
                fix="the checkpoint is incomplete or mixes architectures",
            )

    for field_name in arch.per_layer_fields:
        values = config.get(field_name)
        if values is not None and (not isinstance(values, list) or len(values) != count):
            raise ConfigError(
                f"{field_name} has {len(values) if isinstance(values, list) else 'no list of'} entries for {count} layers",
                path=f"{source}/config.json",
                field=field_name,
                fix=f"give {field_name} one entry per layer",
            )
    return LayerTable(layers=[by_layer[index] for index in range(count)], globals=global_names)


def per_layer_values(arch: Architecture, config: dict, count: int) -> dict[str, list]:
    """Return each per-layer config field as a list, filling in transformers' defaults."""
    values: dict[str, list] = {}
    for field_name in arch.per_layer_fields:
        if isinstance(config.get(field_name), list):
            values[field_name] = list(config[field_name])
        elif field_name == "layer_types" and arch.default_layer_types is not None:
            values[field_name] = arch.default_layer_types(config, count)
    return values
