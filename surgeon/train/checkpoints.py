"""Run state on disk: run-folder file names, RNG state, checkpoint lookup, full-state gathering and Hugging Face folders.

Separate from the loop because these helpers need no run object. `TrainingRun` saves and resumes with them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgeon.train.distributed import unwrap_model

MANIFEST_NAME = "surgeon.json"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.pt"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
METRICS_NAME = "metrics.jsonl"
RUN_CONFIG_NAME = "run.json"


def capture_rng_state() -> dict[str, Any]:
    """Return the python, numpy and torch RNG states as tensors and plain values, safe for `weights_only` loading."""
    python_version, python_internal, python_gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": python_version, "internal": torch.tensor(python_internal, dtype=torch.int64), "gauss": python_gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo `capture_rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))

    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def checkpoint_step(path: Path) -> int | None:
    """Return STEP of a complete `checkpoint-STEP` folder, or None for anything else."""
    suffix = path.name.removeprefix(CHECKPOINT_PREFIX)
    if not path.name.startswith(CHECKPOINT_PREFIX) or not suffix.isdigit():
        return None
    if not (path / TRAINER_STATE_NAME).is_file():
        return None
    return int(suffix)


def find_latest_checkpoint(out: Path) -> Path | None:
    """Return the complete checkpoint folder in `out` with the highest step, or None."""
    if not out.is_dir():
        return None
    steps = {step: path for path in out.iterdir() if (step := checkpoint_step(path)) is not None}
    return steps[max(steps)] if steps else None


def read_checkpoint_dtype(checkpoint: Path) -> torch.dtype:
    """Return the dtype that config.json declares (`dtype`, or `torch_dtype` in older files), float32 if none."""
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def gather_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Collect the unsharded model (and optimizer) state on CPU; a collective call under FSDP, so every rank calls it.

    Optimizer state is keyed by parameter name, so a checkpoint resumes under
    one process, DDP or FSDP alike.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    module = unwrap_model(model)
    model_state = get_model_state_dict(module, options=options)
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=options) if optimizer is not None else None
    return model_state, optimizer_state


def tied_parameter_aliases(module: torch.nn.Module) -> set[str]:
    """Return the second and later names of parameters shared under several names, such as a tied `lm_head.weight`.

    A gathered full state dict contains separate copies of tied tensors, so
    `save_pretrained` cannot detect the tie by identity and would write both.
    """
    seen_ids: set[int] = set()
    aliases = set()
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in seen_ids:
            aliases.add(name)
        seen_ids.add(id(parameter))
    return aliases


def save_model_folder(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    folder: Path,
    *,
    tokenizer: Any,
    source_checkpoint: Path,
    dtype: torch.dtype,
    max_shard_size: str,
) -> None:
    """Write a Hugging Face checkpoint folder: config, sharded safetensors in `dtype`, tokenizer and surgeon.json."""
    module = unwrap_model(model)
    tied_names = tied_parameter_aliases(module)
    state_dict = {
        name: tensor.to(dtype) if tensor.is_floating_point() else tensor
        for name, tensor in state_dict.items()
        if name not in tied_names
    }

    module.config.dtype = dtype
    module.config.use_cache = True
    module.save_pretrained(str(folder), state_dict=state_dict, max_shard_size=max_shard_size)
    module.config.use_cache = False

    tokenizer.save_pretrained(str(folder))
    manifest_path = source_checkpoint / MANIFEST_NAME
    if manifest_path.is_file():
        # Kept so `--train new` still finds the injected layers, and marked so `surgeon verify`
        # does not mistake the retrained shards for a damaged surgeon output.
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest["trained"] = {"from": str(source_checkpoint), "note": "weights rewritten by surgeon train"}
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
