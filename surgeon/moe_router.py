"""Router rows from hidden states of prompts, for the `moe` step's `hidden` router init (needs torch).

This follows mergekit-moe's `hidden` gate mode. For each expert, the prompts
run through the dense model. The router row at layer L is the mean hidden
state at the input of layer L, scaled to unit L2 norm. The mean is over each
prompt's tokens first, then over that expert's prompts.

Memory is bounded by one decoder layer: the model is built on the meta device,
and each layer in turn gets its weights read from the layout's expressions,
runs every prompt, and is moved back to meta. Only the prompts' token rows of
the embedding matrix are read. Peak memory is one layer's weights in float32
plus the prompts' hidden states (tokens x hidden_size floats).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from surgeon.errors import PlanError, TrainingError
from surgeon.plan.expressions import InputTensor, TensorExpr
from surgeon.plan.layout import ModelLayout

logger = logging.getLogger(__name__)

EMBEDDING_SUFFIX = "embed_tokens.weight"


def embedding_expr(layout: ModelLayout) -> tuple[str, TensorExpr]:
    for name, expr in layout.globals_before.items():
        if name.endswith(EMBEDDING_SUFFIX):
            return name, expr
    raise PlanError(
        f"moe: router init 'hidden' needs the token embedding, but no tensor ends in {EMBEDDING_SUFFIX!r}",
        fix="use router init 'zeros' or 'random' for this model",
    )


def source_folder(expr: TensorExpr) -> Path | None:
    """Return the checkpoint folder an expression reads from, following wrapped sources."""
    while not isinstance(expr, InputTensor):
        expr = getattr(expr, "source", None)
        if expr is None:
            return None
    return Path(expr.checkpoint.folder)


def read_tensor(expr: TensorExpr):
    import torch

    return torch.from_numpy(np.array(expr.read_rows(0, expr.rows), dtype=np.float32).reshape(expr.shape))


def hidden_state_router_rows(
    layout: ModelLayout, layers: list[int], prompts: list[list[str]], tokenizer_path: str | None
) -> dict[int, np.ndarray]:
    """Return, for each layer index in `layers`, an (experts, hidden_size) array of unit-norm router rows."""
    try:
        import torch
        import transformers
    except ImportError as error:
        raise TrainingError(
            "moe: router init 'hidden' runs the model and needs torch and transformers",
            field="router.init",
            fix="install surgeon's `train` extra (pip install 'surgeon[train]'), or use router init 'zeros'",
        ) from error

    embedding_name, embedding = embedding_expr(layout)
    folder = tokenizer_path or source_folder(embedding)
    if folder is None:
        raise PlanError(
            f"moe: cannot tell which tokenizer goes with {embedding_name}, because an earlier step computed it",
            field="router.tokenizer",
            fix="set router.tokenizer to the folder that holds the tokenizer files",
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)

    config_values = {key: value for key, value in layout.config.items() if key not in ("model_type", "architectures")}
    config_values["num_hidden_layers"] = len(layout.layers)
    config = transformers.AutoConfig.for_model(layout.config["model_type"], **config_values)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    decoder = model.model
    rotary = type(decoder.rotary_emb)(config=config)

    # NOTE: each prompt runs alone with no attention mask, so sliding-window layers see the whole prompt.
    # The rows match the model only for prompts shorter than its sliding window.
    states = []
    for expert_prompts in prompts:
        for prompt in expert_prompts:
            token_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if not token_ids:
                raise PlanError(f"moe: prompt {prompt!r} has no tokens", field="router.prompts", fix="remove the empty prompt")
            rows = np.stack([embedding.read_rows(token, token + 1) for token in token_ids]).astype(np.float32)
            states.append(torch.from_numpy(rows).unsqueeze(0))
    positions = [torch.arange(state.shape[1]).unsqueeze(0) for state in states]
    rotations = [rotary(state, position) for state, position in zip(states, positions)]

    sparse_layers = set(layers)
    means: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for index in range(max(layers) + 1):
            if index in sparse_layers:
                means[index] = [state[0].double().mean(dim=0) for state in states]
            if index == max(layers):
                break
            module = decoder.layers[index]
            module.to_empty(device="cpu")
            weights = {suffix: read_tensor(expr) for suffix, expr in layout.layers[index].tensors.items()}
            module.load_state_dict(weights, strict=True)
            states = [
                module(state, attention_mask=None, position_ids=position, position_embeddings=rotation)
                for state, position, rotation in zip(states, positions, rotations)
            ]
            states = [state[0] if isinstance(state, tuple) else state for state in states]
            module.to("meta")
            logger.debug("moe: ran %d prompts through layer %d", len(states), index)

    rows_by_layer: dict[int, np.ndarray] = {}
    for index in layers:
        rows = []
        position = 0
        for expert_prompts in prompts:
            expert_states = means[index][position : position + len(expert_prompts)]
            position += len(expert_prompts)
            vector = torch.stack(expert_states).mean(dim=0)
            rows.append((vector / vector.norm()).numpy())
        rows_by_layer[index] = np.stack(rows)
    return rows_by_layer
