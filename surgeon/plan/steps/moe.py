"""Sparse upcycling: turn each dense MLP into a router and a set of experts.

Every expert starts as a byte copy of the dense MLP. Mixtral and the Qwen MoE
classes (with `norm_topk_prob` on) renormalise the top-k router weights to sum
to 1, so identical experts give the dense MLP's output whatever values the
router contains. Options that make the experts differ (noise, Drop-Upcycling,
fine-grained slices) are described in docs/moe.md with whether they keep the
model's function.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from surgeon.architectures import Architecture, MoeTarget, moe_capable_model_types
from surgeon.errors import ArchitectureError, PlanError
from surgeon.plan.expressions import (
    ColumnSlice,
    Concatenated,
    PartialReinit,
    Precomputed,
    RowSlice,
    TensorExpr,
    WithNoise,
    Zeros,
    derive_seed,
    scaled,
)
from surgeon.plan.layout import Layer, ModelLayout
from surgeon.recipe.schema import MoEStep

logger = logging.getLogger(__name__)

DENSE_MLP = {"gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}
ATTENTION_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


def apply_moe(layout: ModelLayout, step: MoEStep, step_index: int) -> ModelLayout:
    """Return the layout with the selected layers' MLPs replaced by routed experts."""
    field_path = f"steps[{step_index}].moe"
    target = moe_target(layout.arch, field_path)
    count = len(layout.layers)
    sparse = sparse_layer_indices(step, count, target, field_path)
    check_attention_biases(layout, target, field_path)
    check_attention_kinds(layout, target, field_path)

    dense_size = int(layout.config["intermediate_size"])
    if dense_size % step.granularity:
        raise PlanError(
            f"moe: granularity {step.granularity} does not divide intermediate_size {dense_size}",
            field=f"{field_path}.granularity",
            value=step.granularity,
            fix=f"use a divisor of {dense_size}",
        )

    routers = router_rows(layout, step, sorted(sparse)) if step.router.init == "hidden" else {}
    layers = []
    for index, layer in enumerate(layout.layers):
        if index in sparse:
            layers.append(sparse_layer(layout, layer, index, step, step_index, target, routers.get(index)))
        else:
            layers.append(layer)

    config = moe_config(layout, step, target, sparse)
    arch = output_architecture(layout.arch, target, step.layout)
    return ModelLayout(arch, config, layers, layout.globals_before, layout.globals_after)


def check_attention_kinds(layout: ModelLayout, target: MoeTarget, field_path: str) -> None:
    """Reject a mix of sliding-window and full-attention layers where the MoE class cannot keep it.

    Measured with transformers 5.25: Qwen3MoeForCausalLM applies the sliding window to every layer once
    `sliding_window` is set, so a Qwen3 model with some full-attention layers would change its outputs.
    """
    kinds = {layer.config_values.get("layer_types") for layer in layout.layers}
    if target.model_type == "qwen3_moe" and {"sliding_attention", "full_attention"} <= kinds:
        raise ArchitectureError(
            "moe: this Qwen3 model mixes sliding-window and full-attention layers, which Qwen3MoeForCausalLM "
            "does not reproduce, so the upcycled model would not compute what the dense model computes",
            field=field_path,
            value=sorted(kind for kind in kinds if kind),
            fix="upcycle a Qwen3 model whose layers all use the same attention kind",
        )


def moe_target(arch: Architecture, field_path: str) -> MoeTarget:
    if arch.moe is None:
        raise ArchitectureError(
            f"moe: architecture {arch.name!r} has no mixture-of-experts counterpart; "
            f"supported model types: {', '.join(moe_capable_model_types())}",
            field=field_path,
            value=arch.name,
            fix="upcycle a llama, mistral, qwen2 or qwen3 checkpoint, or remove the moe step",
        )
    return arch.moe


def sparse_layer_indices(step: MoEStep, count: int, target: MoeTarget, field_path: str) -> set[int]:
    """Return the layer indices that become sparse, checked against the layer count and the target class."""
    if step.layers is None:
        return set(range(count))
    outside = [index for index in step.layers if index >= count]
    if outside:
        raise PlanError(
            f"moe: layers {outside} do not exist; the model has layers 0..{count - 1} at this step",
            field=f"{field_path}.layers",
            value=step.layers,
            fix=f"list indices below {count}, or omit `layers` to make every layer sparse",
        )
    if len(step.layers) < count and target.dense_layers_field is None:
        raise ArchitectureError(
            f"moe: {target.architecture_class} has no dense layers, so every layer must become sparse "
            f"(the recipe lists {len(step.layers)} of {count})",
            field=f"{field_path}.layers",
            value=step.layers,
            fix="omit `layers`; only the Qwen MoE classes keep some layers dense (config mlp_only_layers)",
        )
    return set(step.layers)


def check_attention_biases(layout: ModelLayout, target: MoeTarget, field_path: str) -> None:
    """Reject attention biases the MoE class cannot load, and mixed biased and unbiased layers."""
    biased = [index for index, layer in enumerate(layout.layers) if any(name in layer.tensors for name in ATTENTION_BIASES)]
    if biased and target.attention_bias_field is None:
        raise ArchitectureError(
            f"moe: layers {biased} have q/k/v projection biases, which {target.architecture_class} does not have",
            field=field_path,
            tensor=layout.arch.layer_name(biased[0], "self_attn.q_proj.bias"),
            fix="upcycle a model without attention biases into this class",
        )
    if biased and len(biased) != len(layout.layers):
        raise ArchitectureError(
            f"moe: only layers {biased} have q/k/v biases; {target.architecture_class} needs all or none",
            field=field_path,
            fix="check that every layer of the input has the same attention tensors",
        )


def dense_mlp(layout: ModelLayout, layer: Layer, index: int) -> dict[str, TensorExpr]:
    """Return the layer's gate, up and down projections, rejecting MLP tensors an expert cannot hold."""
    missing = [name for name in DENSE_MLP.values() if name not in layer.tensors]
    if missing:
        raise ArchitectureError(
            f"moe: layer {index} has no {missing[0]}; the moe step needs gate_proj, up_proj and down_proj",
            tensor=layout.arch.layer_name(index, missing[0]),
            fix="upcycle a llama, mistral, qwen2 or qwen3 checkpoint with its standard MLP tensors",
        )
    extra = [suffix for suffix in layer.tensors if suffix.startswith("mlp.") and suffix not in DENSE_MLP.values()]
    if extra:
        raise ArchitectureError(
            f"moe: layer {index} has MLP tensor {extra[0]}, which experts have no place for (experts have no biases)",
            tensor=layout.arch.layer_name(index, extra[0]),
            fix="upcycle a model without MLP biases",
        )
    return {role: layer.tensors[name] for role, name in DENSE_MLP.items()}


def expert_projections(
    dense: dict[str, TensorExpr], step: MoEStep, step_index: int, layer_name: str
) -> list[dict[str, TensorExpr]]:
    """Return gate, up and down for every expert, in router order (copy-major, then slice)."""
    granularity = step.granularity
    width = dense["gate"].shape[0] // granularity
    experts = []
    for copy in range(step.experts):
        for part in range(granularity):
            expert = len(experts)
            if granularity == 1:
                projections = dict(dense)
            else:
                start, stop = part * width, (part + 1) * width
                projections = {
                    "gate": RowSlice(dense["gate"], start, stop),
                    "up": RowSlice(dense["up"], start, stop),
                    # The router splits its weight over `granularity` slices, so each slice's output is scaled back up.
                    "down": scaled(ColumnSlice(dense["down"], start, stop), float(granularity)),
                }
            if step.drop_upcycling is not None:
                projections = drop_upcycled(projections, step, step_index, f"{layer_name}expert{expert}")
            if step.noise is not None:
                for role in step.noise.projections:
                    seed = derive_seed(step.noise.seed, f"step{step_index}:{layer_name}expert{expert}.{role}")
                    projections[role] = WithNoise(projections[role], step.noise.std, seed)
            experts.append(projections)
    return experts


def drop_upcycled(projections: dict[str, TensorExpr], step: MoEStep, step_index: int, key: str) -> dict[str, TensorExpr]:
    """Re-draw a random `ratio` of intermediate units: those rows of gate and up, and those columns of down."""
    options = step.drop_upcycling
    width = projections["gate"].shape[0]
    count = int(round(options.ratio * width))
    if count == 0:
        return projections
    generator = np.random.default_rng(derive_seed(options.seed, f"step{step_index}:{key}:units"))
    units = generator.choice(width, size=count, replace=False)
    return {
        "gate": PartialReinit(projections["gate"], 0, units, derive_seed(options.seed, f"step{step_index}:{key}.gate")),
        "up": PartialReinit(projections["up"], 0, units, derive_seed(options.seed, f"step{step_index}:{key}.up")),
        "down": PartialReinit(projections["down"], 1, units, derive_seed(options.seed, f"step{step_index}:{key}.down")),
    }


def router_expr(
    step: MoEStep, step_index: int, dtype: str, shape: tuple[int, int], layer_name: str, hidden_rows: np.ndarray | None
) -> TensorExpr:
    init = step.router.init
    if init == "zeros":
        return Zeros(dtype, shape)
    if init == "random":
        seed = derive_seed(step.router.seed, f"step{step_index}:{layer_name}router")
        return WithNoise(Zeros(dtype, shape), step.router.std, seed)
    rows = np.repeat(hidden_rows, step.granularity, axis=0)
    return Precomputed(rows, dtype, f"router from hidden states of {sum(len(p) for p in step.router.prompts)} prompts")


def sparse_layer(
    layout: ModelLayout,
    layer: Layer,
    index: int,
    step: MoEStep,
    step_index: int,
    target: MoeTarget,
    hidden_rows: np.ndarray | None,
) -> Layer:
    """Return the layer with its dense MLP replaced by a router, experts and (Qwen2-MoE) a silent shared expert."""
    dense = dense_mlp(layout, layer, index)
    layer_name = layout.arch.layer_name(index, "")
    experts = expert_projections(dense, step, step_index, layer_name)
    hidden_size = dense["gate"].shape[1]
    router = router_expr(step, step_index, dense["gate"].dtype, (len(experts), hidden_size), layer_name, hidden_rows)

    moe_tensors: dict[str, TensorExpr] = {}
    if step.layout == "per_expert":
        moe_tensors[target.router] = router
        for expert, projections in enumerate(experts):
            for role, template in target.expert_projections.items():
                moe_tensors[template.format(expert)] = projections[role]
    else:
        width = experts[0]["gate"].shape[0]
        moe_tensors[target.fused_router] = router
        gate_up = [projections[role] for projections in experts for role in ("gate", "up")]
        moe_tensors[target.fused_gate_up] = Concatenated(gate_up, (len(experts), 2 * width, hidden_size))
        moe_tensors[target.fused_down] = Concatenated([p["down"] for p in experts], (len(experts), hidden_size, width))

    if target.shared_expert_projections is not None:
        # The class always adds a shared expert. It copies the dense gate and up projections, and
        # its zero down projection makes its output zero, so the routed experts alone carry the dense MLP.
        for role, name in target.shared_expert_projections.items():
            moe_tensors[name] = dense[role] if role != "down" else Zeros(dense["down"].dtype, dense["down"].shape)
        moe_tensors[target.shared_expert_gate] = Zeros(dense["gate"].dtype, (1, hidden_size))

    tensors: dict[str, TensorExpr] = {}
    for suffix, expr in layer.tensors.items():
        if suffix in DENSE_MLP.values():
            tensors.update(moe_tensors)
            moe_tensors = {}
        else:
            tensors[suffix] = expr

    init = f"{layer.origin.init}, MLP upcycled to {len(experts)} experts (router {step.router.init})"
    origin = dataclasses.replace(layer.origin, init=init)
    return Layer(tensors, dict(layer.config_values), origin)


def moe_config(layout: ModelLayout, step: MoEStep, target: MoeTarget, sparse: set[int]) -> dict:
    """Return the dense config rewritten for the MoE class, with every field its forward pass reads."""
    config = dict(layout.config)
    dense_size = int(config["intermediate_size"])
    expert_size = dense_size // step.granularity
    config["model_type"] = target.model_type
    config["architectures"] = [target.architecture_class]
    config[target.experts_field] = step.experts * step.granularity
    config["num_experts_per_tok"] = step.experts_per_token
    config.update(target.fixed_config)

    if target.expert_size_field is not None:
        config[target.expert_size_field] = expert_size
    else:
        config["intermediate_size"] = expert_size
    if target.shared_expert_size_field is not None:
        config[target.shared_expert_size_field] = dense_size
    if target.dense_layers_field is not None:
        # NOTE: these are output layer indices at this step; a later step that adds or removes layers does not update them.
        config[target.dense_layers_field] = sorted(set(range(len(layout.layers))) - sparse)
    if target.attention_bias_field is not None:
        config[target.attention_bias_field] = "self_attn.q_proj.bias" in layout.layers[0].tensors
    if target.dense_layers_field is not None and all("layer_types" in layer.config_values for layer in layout.layers):
        # Written out because the MoE class's default layer_types rule differs from the dense class's.
        config["layer_types"] = [layer.config_values["layer_types"] for layer in layout.layers]
    return config


def output_architecture(arch: Architecture, target: MoeTarget, layout: str) -> Architecture:
    """Return the table entry for the MoE output, so later steps find its residual-stream outputs."""
    if layout == "per_expert":
        down = target.expert_projections["down"].replace("{}", "*").removesuffix(".weight")
    else:
        down = target.fused_down
    projections = ("self_attn.o_proj", down)
    if target.shared_expert_projections is not None:
        projections += (target.shared_expert_projections["down"].removesuffix(".weight"),)
    return dataclasses.replace(
        arch,
        name=target.model_type,
        model_types=(target.model_type,),
        output_projections=projections,
        mlp_projections={},
        moe=None,
    )


def router_rows(layout: ModelLayout, step: MoEStep, layers: list[int]) -> dict[int, np.ndarray]:
    """Return per sparse layer the (experts, hidden_size) router rows from prompt hidden states (needs torch)."""
    from surgeon.moe_router import hidden_state_router_rows

    return hidden_state_router_rows(layout, layers, step.router.prompts, step.router.tokenizer)

