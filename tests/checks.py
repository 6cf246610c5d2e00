"""Checks shared by the surgery tests: load with transformers, compare logits and bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from surgeon.checkpoint import open_checkpoint


def load_causal_lm(folder: Path):
    """Load a checkpoint in float32 and return (model, loading_info)."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    model.eval()
    return model, info


def token_ids(text: str, vocab_size: int, length: int = 128) -> torch.Tensor:
    """Map real text to token ids below vocab_size: the tokenizer when it fits, bytes otherwise."""
    data = text.encode("utf-8")[: length * 4]
    ids = torch.tensor([byte % vocab_size for byte in data[:length]], dtype=torch.long)
    return ids.unsqueeze(0)


def max_logit_difference(first: Path, second: Path, ids: torch.Tensor) -> float:
    """Return the max absolute difference between two checkpoints' logits on the same tokens."""
    model_a, _ = load_causal_lm(first)
    model_b, _ = load_causal_lm(second)
    with torch.no_grad():
        logits_a = model_a(ids).logits
        logits_b = model_b(ids).logits
    return (logits_a - logits_b).abs().max().item()


def tensor_bytes(folder: Path) -> dict[str, bytes]:
    """Return every tensor's raw data bytes, read through surgeon's own header parser."""
    checkpoint = open_checkpoint(folder)
    try:
        return {name: checkpoint.read(info, 0, info.nbytes) for name, info in checkpoint.tensors.items()}
    finally:
        checkpoint.close()


def folder_digest(folder: Path) -> dict[str, str]:
    """Return sha256 of every file in a folder, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
