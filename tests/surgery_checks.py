"""Helpers the growth, slice and mergekit tests share: run surgeon, read tensors, load with transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m surgeon ARGUMENTS` from this checkout and return the finished process."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "surgeon", *arguments], cwd=cwd or REPO_ROOT, env=environment, capture_output=True, text=True
    )


def read_tensors(folder: Path) -> dict:
    """Return every tensor of a checkpoint folder as torch tensors."""
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def load_model(folder: Path):
    """Load a checkpoint with transformers and return (model, loading_info)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def layer_indices(tensors: dict, prefix: str = "model.layers.") -> set[int]:
    return {int(name[len(prefix) :].split(".")[0]) for name in tensors if name.startswith(prefix)}


def layer_tensors(tensors: dict, index: int) -> dict:
    """Return layer `index`'s tensors keyed by suffix."""
    prefix = f"model.layers.{index}."
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}
