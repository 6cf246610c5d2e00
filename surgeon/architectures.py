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
class MoeTarget:
    """The mixture-of-experts class a dense family is upcycled into, as tensor names and config fields.

    Names are layer suffixes; `{}` in an expert name is the expert index. The
    fused names are the parameters transformers 5 builds when it loads the
    per-expert names (its `conversion_mapping.py` stacks the experts on a new
    leading dimension and concatenates gate and up along dimension 1).
    """

    model_type: str
    architecture_class: str
    experts_field: str
    router: str
    expert_projections: dict[str, str]
    fused_router: str
    fused_gate_up: str
    fused_down: str
    # Config field of one expert's intermediate size; None when experts share `intermediate_size`.
    expert_size_field: str | None = None
    # Config field that lists the layers kept dense; None when every layer must be sparse.
    dense_layers_field: str | None = None
    # Shared expert, always active beside the routed ones: projection names, its sigmoid gate and its size field.
    shared_expert_projections: dict[str, str] | None = None
    shared_expert_gate: str | None = None
    shared_expert_size_field: str | None = None
    # Config field that switches on q/k/v projection biases; None when the class has no attention biases.
    attention_bias_field: str | None = None
    fixed_config: dict = field(default_factory=dict)


MIXTRAL = MoeTarget(
    model_type="mixtral",
    architecture_class="MixtralForCausalLM",
    experts_field="num_local_experts",
    router="block_sparse_moe.gate.weight",
    expert_projections={
        "gate": "block_sparse_moe.experts.{}.w1.weight",
        "up": "block_sparse_moe.experts.{}.w3.weight",
        "down": "block_sparse_moe.experts.{}.w2.weight",
    },
    fused_router="mlp.gate.weight",
    fused_gate_up="mlp.experts.gate_up_proj",
    fused_down="mlp.experts.down_proj",
    fixed_config={"router_jitter_noise": 0.0},
)

_QWEN_EXPERTS = {
    "gate": "mlp.experts.{}.gate_proj.weight",
    "up": "mlp.experts.{}.up_proj.weight",
    "down": "mlp.experts.{}.down_proj.weight",
}

QWEN2_MOE = MoeTarget(
    model_type="qwen2_moe",
    architecture_class="Qwen2MoeForCausalLM",
    experts_field="num_experts",
    router="mlp.gate.weight",
    expert_projections=_QWEN_EXPERTS,
    fused_router="mlp.gate.weight",
    fused_gate_up="mlp.experts.gate_up_proj",
    fused_down="mlp.experts.down_proj",
    expert_size_field="moe_intermediate_size",
    dense_layers_field="mlp_only_layers",
    shared_expert_projections={
        "gate": "mlp.shared_expert.gate_proj.weight",
        "up": "mlp.shared_expert.up_proj.weight",
        "down": "mlp.shared_expert.down_proj.weight",
    },
    shared_expert_gate="mlp.shared_expert_gate.weight",
    shared_expert_size_field="shared_expert_intermediate_size",
    attention_bias_field="qkv_bias",
    fixed_config={"norm_topk_prob": True, "decoder_sparse_step": 1},
)

QWEN3_MOE = MoeTarget(
    model_type="qwen3_moe",
    architecture_class="Qwen3MoeForCausalLM",
    experts_field="num_experts",
    router="mlp.gate.weight",
    expert_projections=_QWEN_EXPERTS,
    fused_router="mlp.gate.weight",
    fused_gate_up="mlp.experts.gate_up_proj",
    fused_down="mlp.experts.down_proj",
    expert_size_field="moe_intermediate_size",
    dense_layers_field="mlp_only_layers",
    attention_bias_field="attention_bias",
    fixed_config={"norm_topk_prob": True, "decoder_sparse_step": 1},
)


@dataclass(frozen=True)
class Architecture:
    """Layout of one model family: where its decoder layers live and which config fields are per layer."""

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
    # The mixture-of-experts class the `moe` step turns this family into; None when there is none.
    moe: MoeTarget | None = None

    def layer_name(self, index: int, suffix: str) -> str:
        return self.layer_prefix.format(index) + suffix

    def layer_pattern(self) -> re.Pattern:
        before, after = self.layer_prefix.split("{}")
        return re.compile(re.escape(before) + r"(\d+)" + re.escape(after) + r"(.+)")


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("llama", ("llama",), moe=MIXTRAL),
        Architecture("mistral", ("mistral",), moe=MIXTRAL),
        Architecture("qwen2", ("qwen2",), default_layer_types=_qwen_layer_types, moe=QWEN2_MOE),
        Architecture("qwen3", ("qwen3",), default_layer_types=_qwen_layer_types, moe=QWEN3_MOE),
        Architecture("gemma2", ("gemma2",), default_layer_types=_gemma2_layer_types),
        Architecture("gemma3_text", ("gemma3_text",), default_layer_types=_gemma3_layer_types),
        Architecture("phi3", ("phi3",), mlp_projections={"gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}),
        # MoE checkpoints as published (and as the `moe` step writes them), one tensor per expert.
        Architecture("mixtral", ("mixtral",), output_projections=("self_attn.o_proj", "block_sparse_moe.experts.*.w2"), mlp_projections={}),
        Architecture(
            "qwen2_moe",
            ("qwen2_moe",),
            output_projections=("self_attn.o_proj", "mlp.experts.*.down_proj", "mlp.shared_expert.down_proj"),
            default_layer_types=_qwen_layer_types,
            mlp_projections={},
        ),
        Architecture(
            "qwen3_moe",
            ("qwen3_moe",),
            output_projections=("self_attn.o_proj", "mlp.experts.*.down_proj"),
            default_layer_types=_qwen_layer_types,
            mlp_projections={},
        ),
    )
}


def supported_model_types() -> list[str]:
    return sorted(model_type for arch in ARCHITECTURES.values() for model_type in arch.model_types)


def moe_capable_model_types() -> list[str]:
    return sorted(model_type for arch in ARCHITECTURES.values() if arch.moe for model_type in arch.model_types)


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
        if match and match.group(1) != str(int(match.group(1))):
            raise CheckpointError(
                f"layer index {match.group(1)!r} has a leading zero, which transformers would not load",
                path=source,
                tensor=name,
                fix="rename the tensors to plain layer numbers (model.layers.1., not model.layers.01.)",
            )
        if match:
            by_layer.setdefault(int(match.group(1)), []).append(match.group(2))
        else:
            global_names.append(name)

    count = len(by_layer)
    if sorted(by_layer) != list(range(count)):
        missing = sorted(set(range(max(by_layer, default=-1) + 1)) - set(by_layer))
        raise CheckpointError(
            f"decoder layers are not numbered 0..{max(by_layer)} without gaps: layers {missing} have no tensors",
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
            f"config.json sets {arch.num_layers_field} = {declared!r}, but the tensors have {count} layers",
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
