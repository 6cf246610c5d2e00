"""Check that a tokenizer taken from one model fits embeddings taken from another."""

from __future__ import annotations

import json

from surgeon.checkpoint import Checkpoint
from surgeon.errors import PlanError

TOKENIZER_FILE = "tokenizer.json"


def _vocabulary(checkpoint: Checkpoint, key: str) -> tuple[dict, list]:
    path = checkpoint.folder / TOKENIZER_FILE
    if not path.is_file():
        raise PlanError(
            f"model {key!r} has no {TOKENIZER_FILE}, so surgeon cannot check that its tokenizer matches the embeddings",
            path=path,
            fix="take the tokenizer from the model that supplies the embeddings",
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    added = [(token.get("id"), token.get("content")) for token in data.get("added_tokens", [])]
    return data.get("model", {}).get("vocab", {}), sorted(added)


def check_tokenizer_matches(inputs: dict[str, Checkpoint], tokenizer_model: str, embeddings_model: str) -> None:
    """Raise PlanError unless both models' tokenizers map every token to the same id.

    Token ids index the embedding rows, so a tokenizer with another mapping
    would silently scramble the model's input and output.
    """
    if tokenizer_model == embeddings_model:
        return
    if _vocabulary(inputs[tokenizer_model], tokenizer_model) != _vocabulary(inputs[embeddings_model], embeddings_model):
        raise PlanError(
            f"the tokenizer of model {tokenizer_model!r} maps tokens to other ids than the tokenizer of {embeddings_model!r}, "
            "whose embeddings the output uses",
            path=inputs[tokenizer_model].folder / TOKENIZER_FILE,
            field="tokenizer_model",
            value=tokenizer_model,
            fix=f"take the tokenizer from {embeddings_model!r}",
        )
