"""Train a causal LM checkpoint: the loop, parameter selection, checkpoints and resume.

One process, DDP and FSDP2 under `torchrun` share one loop. Every optimizer step
reads a global batch of per-process batch × world size × gradient accumulation
windows, split over ranks as `PackedWindows.micro_batch` describes.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from surgeon.errors import TrainingError
from surgeon.train.data import BatchLayout, PackedWindows, fingerprint_windows, pack_windows, read_documents, tokenize_documents
from surgeon.train.evaluate import (
    autocast_context,
    choose_autocast_dtype,
    choose_device,
    evaluate_model,
    load_causal_lm,
    load_eval_windows,
    load_tokenizer,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "surgeon.json"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.pt"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
METRICS_NAME = "metrics.jsonl"
RUN_CONFIG_NAME = "run.json"

# Settings that fix the data order and the learning-rate schedule; a resume with other values would not continue the run.
RESUME_LOCKED_SETTINGS = ("seq_len", "steps", "lr", "min_lr_ratio", "warmup_steps", "seed", "train")


@dataclass
class TrainConfig:
    """Settings of one training run; `batch_size` is per process."""

    checkpoint: Path
    data: list[Path]
    out: Path
    eval_data: list[Path] = field(default_factory=list)
    train: list[str] = field(default_factory=lambda: ["all"])
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = 1.0
    eval_every: int = 0
    eval_batch_size: int | None = None
    eval_max_windows: int | None = None
    save_every: int = 0
    seed: int = 0
    gradient_checkpointing: bool = False
    fsdp: bool = False
    device: str = "auto"
    precision: str = "auto"
    max_shard_size: str = "2GB"
    resume: bool = False
    stop_after: int | None = None

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.out = Path(self.out)
        self.data = [Path(path) for path in self.data]
        self.eval_data = [Path(path) for path in self.eval_data]
        self.train = list(self.train)

    def validate(self) -> None:
        """Raise TrainingError on a setting that cannot work."""
        positive = {"seq_len": self.seq_len, "batch_size": self.batch_size, "grad_accum": self.grad_accum, "steps": self.steps}
        for name, value in positive.items():
            if value < 1:
                raise TrainingError("must be at least 1", field=name, value=value)

        if self.seq_len < 2:
            raise TrainingError("the sequence length must be at least 2 tokens", field="seq_len", value=self.seq_len)
        if self.lr <= 0:
            raise TrainingError("the learning rate must be positive", field="lr", value=self.lr)
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainingError("must be between 0 and 1", field="min_lr_ratio", value=self.min_lr_ratio)
        if self.warmup_steps < 0 or self.eval_every < 0 or self.save_every < 0 or self.max_grad_norm < 0:
            raise TrainingError("warmup steps, eval and save intervals and the clipping norm cannot be negative")
        if self.eval_every and not self.eval_data:
            raise TrainingError("--eval-every needs --eval-data", field="eval_every", value=self.eval_every)
        source, out = Path(self.checkpoint).resolve(), Path(self.out).resolve()
        if out == source or out.is_relative_to(source) or source.is_relative_to(out):
            raise TrainingError(
                "the run folder overlaps the checkpoint folder, whose files training must not change",
                path=self.out,
                fix="pass an --out folder outside the checkpoint folder",
            )
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise TrainingError("must be between 1 and --steps", field="stop_after", value=self.stop_after)
        if not self.data:
            raise TrainingError("no training data given", field="data", fix="pass --data FILE")

    def to_json_dict(self) -> dict[str, Any]:
        values = asdict(self)
        for key, value in values.items():
            if isinstance(value, Path):
                values[key] = str(value)
            elif isinstance(value, list):
                values[key] = [str(item) for item in value]
        return values


@dataclass(frozen=True)
class TrainResult:
    """Outcome of a finished or stopped run: the last step, its losses and the folders written."""

    out: Path
    step: int
    final_dir: Path | None
    last_checkpoint: Path | None
    loss: float | None
    eval_loss: float | None
    trainable_parameters: int


class WarmupCosineSchedule:
    """Learning-rate factor: linear warmup from 0 to 1, then cosine decay to `min_ratio` at `total_steps`.

    A class rather than a closure, because `LambdaLR.state_dict` stores an
    object's `__dict__` and drops plain functions.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)

        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * cosine


# ---------------------------------------------------------------- parameter selection


def read_new_layer_indices(checkpoint: Path) -> list[int]:
    """Return the decoder layer indices that the checkpoint's `surgeon.json` marks as new (injected)."""
    manifest_path = checkpoint / MANIFEST_NAME
    if not manifest_path.is_file():
        raise TrainingError(
            "--train new needs surgeon.json, which marks the injected layers, but it is missing",
            path=manifest_path,
            fix="train a folder written by surgeon, or select parameters with --train all or --train 'PATTERN'",
        )

    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TrainingError(f"invalid JSON: {error.msg}", path=manifest_path, line=error.lineno) from error

    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list):
        raise TrainingError("surgeon.json has no 'layers' list", path=manifest_path, field="layers")

    indices = []
    for position, layer in enumerate(layers):
        if not isinstance(layer, dict) or not isinstance(layer.get("index"), int):
            raise TrainingError("each layer needs an integer 'index'", path=manifest_path, field=f"layers[{position}]", value=layer)
        if layer.get("new") is True:
            indices.append(layer["index"])

    if not indices:
        raise TrainingError(
            "surgeon.json marks no layer as new, so --train new would train nothing",
            path=manifest_path,
            fix="use --train all or --train 'PATTERN'",
        )
    return sorted(indices)


def _selector_matcher(selector: str, checkpoint: Path) -> Any:
    """Return a predicate on parameter names for one `--train` value."""
    if selector == "all":
        return lambda name: True

    if selector == "new":
        prefixes = tuple(f"model.layers.{index}." for index in read_new_layer_indices(checkpoint))
        return lambda name: name.startswith(prefixes)

    if selector.startswith("re:"):
        try:
            pattern = re.compile(selector[3:])
        except re.error as error:
            raise TrainingError(f"invalid regular expression: {error}", field="train", value=selector) from error
        return lambda name: pattern.search(name) is not None

    return lambda name: fnmatch.fnmatchcase(name, selector)


def select_trainable_parameters(model: torch.nn.Module, selectors: Sequence[str], checkpoint: Path) -> list[str]:
    """Set `requires_grad` to train the union of `selectors` and freeze the rest; return the trainable names.

    A selector is `all`, `new` (layers marked new in surgeon.json), `re:REGEX`
    (searched in the name) or an fnmatch glob matched against the whole name.
    Tied weights are one parameter under several names: it trains when any of
    its names matches, and is counted and returned once.
    """
    all_names = list(model.named_parameters(remove_duplicate=False))
    selected_ids: set[int] = set()
    for selector in selectors:
        matches = _selector_matcher(selector, checkpoint)
        matched = [parameter for name, parameter in all_names if matches(name)]
        if not matched:
            examples = ", ".join(name for name, _ in all_names[:3])
            raise TrainingError(
                "the selector matches no parameter",
                field="train",
                value=selector,
                fix=f"parameter names look like {examples}; use a glob such as 'model.layers.4.*' or 're:REGEX'",
            )
        selected_ids.update(id(parameter) for parameter in matched)

    for _, parameter in all_names:
        parameter.requires_grad_(id(parameter) in selected_ids)

    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """Build AdamW over the trainable parameters only, so weight decay never touches frozen ones.

    Matrices get weight decay and vectors (norm weights, biases) do not, as in
    most LLM training recipes.
    """
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    decayed = [parameter for parameter in trainable if parameter.ndim >= 2]
    not_decayed = [parameter for parameter in trainable if parameter.ndim < 2]

    groups = [{"params": decayed, "weight_decay": config.weight_decay}]
    if not_decayed:
        groups.append({"params": not_decayed, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a `torchrun` launch; world size 1 without one."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def start_process_group(requested_device: str) -> ProcessGroup:
    """Join the `torchrun` process group when WORLD_SIZE is set: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(requested_device, local_rank)

    if world_size > 1 and not dist.is_initialized():
        # NOTE: the tests run only the gloo/CPU branch; the NCCL branch has not been run on a GPU yet.
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        logger.info("joined process group: rank %d of %d on %s", rank, world_size, device)
    return ProcessGroup(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder layer in the backward pass, with non-reentrant checkpointing.

    Non-reentrant checkpointing still sends gradients to trainable layers when the
    layer inputs need none, as with frozen embeddings under `--train new`.
    transformers 5 renamed the method, so both names are tried.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def wrap_model(model: torch.nn.Module, config: TrainConfig, group: ProcessGroup, autocast_dtype: torch.dtype | None) -> torch.nn.Module:
    """Move the model to its device and wrap it in FSDP2 (`--fsdp`) or DDP (several processes)."""
    if config.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise TrainingError("--fsdp needs a process group", field="fsdp", fix="launch with torchrun")

        mesh = init_device_mesh(group.device.type, (group.world_size,))
        mixed_precision = MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)
        # fully_shard moves each shard to the mesh device, so the full model never sits on one accelerator.
        # NOTE: every process still loads the full float32 model into CPU memory before sharding it.
        for layer in model.get_submodule("model.layers"):
            fully_shard(layer, mesh=mesh, mp_policy=mixed_precision)
        fully_shard(model, mesh=mesh, mp_policy=mixed_precision)
        return model

    model.to(group.device)
    if group.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [group.device.index] if group.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    return model


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Return the Hugging Face model inside a DDP wrapper; FSDP2 shards in place and needs no unwrapping."""
    return getattr(model, "module", model)


def gradient_sync(model: torch.nn.Module, sync: bool) -> Any:
    """Return a context that skips the gradient all-reduce on accumulation micro-steps that are not the last."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    return nullcontext()


def all_reduce_mean(value: torch.Tensor, group: ProcessGroup) -> float:
    """Average a scalar over all processes."""
    if group.world_size > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= group.world_size
    return value.item()


# ---------------------------------------------------------------- state and checkpoints


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


# ---------------------------------------------------------------- the run


class TrainingRun:
    """One training run from setup to the final checkpoint; `run()` executes it."""

    def __init__(self, config: TrainConfig) -> None:
        config.validate()
        self.config = config
        self.group = start_process_group(config.device)
        self.autocast_dtype = choose_autocast_dtype(self.group.device, config.precision)
        self.layout = BatchLayout(config.batch_size, self.group.world_size, config.grad_accum)

        self.step = 0
        self.position = 0
        self.tokens = 0
        self.elapsed_before = 0.0
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.last_checkpoint: Path | None = None

    # -- setup

    def _prepare_data(self) -> None:
        config = self.config
        self.tokenizer = load_tokenizer(config.checkpoint)

        tokens = tokenize_documents(self.tokenizer, read_documents(config.data))
        windows = pack_windows(tokens, config.seq_len)
        self.data = PackedWindows(windows, config.seed)
        self.data_fingerprint = fingerprint_windows(windows)
        logger.info("training data: %d tokens in %d windows of %d", tokens.numel(), len(self.data), config.seq_len)
        if len(self.data) < self.layout.global_batch:
            logger.warning(
                "the data has %d windows, fewer than one global batch of %d; windows repeat within a step",
                len(self.data),
                self.layout.global_batch,
            )

        self.eval_windows = []
        if config.eval_data:
            self.eval_windows = load_eval_windows(self.tokenizer, config.eval_data, config.seq_len, config.eval_max_windows)
            logger.info("held-out data: %d windows of up to %d tokens", len(self.eval_windows), config.seq_len)

    def _check_out_folder(self) -> Path | None:
        """Return the checkpoint to resume from, or None for a fresh run in an unused folder."""
        config = self.config
        latest = find_latest_checkpoint(config.out)
        if config.resume:
            if latest is None:
                raise TrainingError("--resume found no complete checkpoint-STEP folder", path=config.out, fix="start without --resume")
            return latest

        if latest is not None or (config.out / METRICS_NAME).exists():
            raise TrainingError(
                "the output folder already contains a run",
                path=config.out,
                fix="pass --resume to continue it, or choose another --out",
            )
        return None

    def _check_resume_config(self) -> None:
        saved_path = self.config.out / RUN_CONFIG_NAME
        if not saved_path.is_file():
            return

        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        current = self.config.to_json_dict()
        for name in RESUME_LOCKED_SETTINGS:
            if name in saved and saved[name] != current[name]:
                raise TrainingError(
                    "this setting differs from the run being resumed",
                    path=saved_path,
                    field=name,
                    value=current[name],
                    fix=f"resume with the saved value {saved[name]!r}",
                )

    def _prepare_model(self, resume_from: Path | None) -> None:
        config = self.config
        self.save_dtype = read_checkpoint_dtype(config.checkpoint)

        # Float32 master weights: autocast runs the matmuls in bfloat16 where chosen, and upcasting keeps frozen tensors exact.
        model = load_causal_lm(resume_from or config.checkpoint, torch.float32)
        model.config.use_cache = False
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model)

        trainable_names = select_trainable_parameters(model, config.train, config.checkpoint)
        self.trainable_parameters = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        total = sum(parameter.numel() for parameter in model.parameters())
        logger.info("training %d of %d parameters in %d tensors", self.trainable_parameters, total, len(trainable_names))

        self.model = wrap_model(model, config, self.group, self.autocast_dtype)
        self.trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosineSchedule(config.warmup_steps, config.steps, config.min_lr_ratio)
        )

    def _load_training_state(self, checkpoint: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        trainer_state = torch.load(checkpoint / TRAINER_STATE_NAME, weights_only=True)
        if trainer_state["data_fingerprint"] != self.data_fingerprint:
            raise TrainingError(
                "the training data differs from the data of the run being resumed",
                path=checkpoint,
                fix="resume with the same --data files and --seq-len",
            )
        if trainer_state["global_batch"] != self.layout.global_batch:
            raise TrainingError(
                f"the global batch is {self.layout.global_batch} windows but the saved run used {trainer_state['global_batch']}",
                path=checkpoint,
                fix="keep batch size × processes × gradient accumulation the same",
            )

        optimizer_state = torch.load(checkpoint / OPTIMIZER_NAME, weights_only=True)
        set_optimizer_state_dict(
            unwrap_model(self.model), self.optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
        )
        self.scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER_NAME, weights_only=True))

        rng_path = checkpoint / f"rng_state_{self.group.rank}.pt"
        if rng_path.is_file():
            restore_rng_state(torch.load(rng_path, weights_only=True))
        else:
            logger.warning("no RNG state for rank %d in %s; keeping the seeded state", self.group.rank, checkpoint)

        self.step = int(trainer_state["step"])
        self.position = int(trainer_state["position"])
        self.tokens = int(trainer_state["tokens"])
        self.elapsed_before = float(trainer_state["elapsed"])
        self.last_loss = trainer_state.get("loss")
        self.last_eval_loss = trainer_state.get("eval_loss")

    def _prepare_out_folder(self, resumed: bool) -> None:
        """Write run.json and, on resume, drop metric lines after the resumed step so a crashed tail is not repeated."""
        if not self.group.is_main:
            return

        self.config.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.config.out / METRICS_NAME
        if resumed and metrics_path.is_file():
            lines = metrics_path.read_text(encoding="utf-8").splitlines()
            kept_lines = [line for line in lines if line.strip() and json.loads(line)["step"] <= self.step]
            metrics_path.write_text("".join(f"{line}\n" for line in kept_lines), encoding="utf-8")

        run_config = self.config.to_json_dict()
        run_config["world_size"] = self.group.world_size
        run_config["global_batch"] = self.layout.global_batch
        (self.config.out / RUN_CONFIG_NAME).write_text(json.dumps(run_config, indent=2) + "\n", encoding="utf-8")

    # -- steps

    def _train_step(self) -> tuple[float, float, float]:
        """Run one optimizer step over the global batch; return (mean loss, grad norm before clipping, learning rate)."""
        config = self.config
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)

        loss_sum = torch.zeros((), device=self.group.device)
        for micro_step in range(config.grad_accum):
            input_ids = self.data.micro_batch(self.position, self.layout, micro_step, self.group.rank).to(self.group.device)
            with gradient_sync(self.model, micro_step == config.grad_accum - 1):
                with autocast_context(self.group.device, self.autocast_dtype):
                    loss = self.model(input_ids=input_ids, labels=input_ids).loss
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach().float()

        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()

        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()

        self.step += 1
        self.position += self.layout.global_batch
        self.tokens += self.layout.global_batch * config.seq_len
        mean_loss = all_reduce_mean(loss_sum / config.grad_accum, self.group)
        return mean_loss, grad_norm.item(), learning_rate

    def _evaluate(self) -> float:
        evaluated_model = self.model if self.config.fsdp else unwrap_model(self.model)
        result = evaluate_model(
            evaluated_model,
            self.eval_windows,
            batch_size=self.config.eval_batch_size or self.config.batch_size,
            device=self.group.device,
            autocast_dtype=self.autocast_dtype,
            rank=self.group.rank,
            world_size=self.group.world_size,
        )
        return result.loss

    def _save_checkpoint(self) -> Path:
        """Write `checkpoint-STEP` through a temporary folder, so a folder with trainer_state.pt is always complete."""
        out = self.config.out
        final_path = out / f"{CHECKPOINT_PREFIX}{self.step}"
        staging_path = out / f"{CHECKPOINT_PREFIX}{self.step}.tmp"

        model_state, optimizer_state = gather_full_state(self.model, self.optimizer)
        if self.group.is_main:
            shutil.rmtree(staging_path, ignore_errors=True)
            staging_path.mkdir(parents=True)
            # Checkpoints keep the float32 master weights so a resume is exact; final/ uses the input's dtype.
            save_model_folder(
                self.model,
                model_state,
                staging_path,
                tokenizer=self.tokenizer,
                source_checkpoint=self.config.checkpoint,
                dtype=torch.float32,
                max_shard_size=self.config.max_shard_size,
            )
            torch.save(optimizer_state, staging_path / OPTIMIZER_NAME)
            torch.save(self.scheduler.state_dict(), staging_path / SCHEDULER_NAME)
        self.group.barrier()

        torch.save(capture_rng_state(), staging_path / f"rng_state_{self.group.rank}.pt")
        self.group.barrier()

        if self.group.is_main:
            trainer_state = {
                "step": self.step,
                "position": self.position,
                "tokens": self.tokens,
                "elapsed": self.elapsed_before + (time.perf_counter() - self.started),
                "loss": self.last_loss,
                "eval_loss": self.last_eval_loss,
                "global_batch": self.layout.global_batch,
                "world_size": self.group.world_size,
                "data_fingerprint": self.data_fingerprint,
            }
            torch.save(trainer_state, staging_path / TRAINER_STATE_NAME)
            shutil.rmtree(final_path, ignore_errors=True)
            staging_path.rename(final_path)
            logger.info("saved %s", final_path)
        self.group.barrier()

        self.last_checkpoint = final_path
        return final_path

    def _save_final(self) -> Path:
        final_path = self.config.out / "final"
        model_state, _ = gather_full_state(self.model, None)
        if self.group.is_main:
            shutil.rmtree(final_path, ignore_errors=True)
            save_model_folder(
                self.model,
                model_state,
                final_path,
                tokenizer=self.tokenizer,
                source_checkpoint=self.config.checkpoint,
                dtype=self.save_dtype,
                max_shard_size=self.config.max_shard_size,
            )
            logger.info("saved %s", final_path)
        self.group.barrier()
        return final_path

    def _record(self, metrics: dict[str, Any], progress: tqdm) -> None:
        """Print one metrics line above the progress bar and append it to metrics.jsonl (main process only)."""
        if not self.group.is_main:
            return

        with (self.config.out / METRICS_NAME).open("a", encoding="utf-8") as metrics_file:
            metrics_file.write(json.dumps(metrics) + "\n")
        progress.write(format_metrics(metrics, self.config.steps), file=sys.stdout)

    def _elapsed(self) -> float:
        return round(self.elapsed_before + (time.perf_counter() - self.started), 3)

    def run(self) -> TrainResult:
        """Train until `--steps` (or `--stop-after`), evaluating and saving on schedule."""
        config = self.config
        try:
            resume_from = self._check_out_folder()
            if resume_from is not None:
                self._check_resume_config()
            self.group.barrier()

            seed_everything(config.seed)
            self._prepare_data()
            self._prepare_model(resume_from)
            if resume_from is not None:
                self._load_training_state(resume_from)
                logger.info("resuming from %s at step %d", resume_from, self.step)
            self._prepare_out_folder(resumed=resume_from is not None)
            self.group.barrier()

            return self._loop()
        finally:
            if self.group.world_size > 1 and dist.is_initialized():
                dist.destroy_process_group()

    def _loop(self) -> TrainResult:
        config = self.config
        last_step = config.stop_after or config.steps
        self.started = time.perf_counter()
        progress = tqdm(total=config.steps, initial=self.step, disable=not self.group.is_main, desc="train", unit="step", dynamic_ncols=True)

        if self.step == 0 and self.eval_windows:
            self.last_eval_loss = self._evaluate()
            self._record({"step": 0, "tokens": 0, "elapsed": self._elapsed(), "eval_loss": self.last_eval_loss}, progress)

        while self.step < last_step:
            loss, grad_norm, learning_rate = self._train_step()
            self.last_loss = loss
            metrics: dict[str, Any] = {
                "step": self.step,
                "loss": loss,
                "lr": learning_rate,
                "grad_norm": grad_norm,
                "tokens": self.tokens,
                "elapsed": self._elapsed(),
            }

            at_end = self.step == last_step
            if self.eval_windows and ((config.eval_every and self.step % config.eval_every == 0) or self.step == config.steps):
                self.last_eval_loss = self._evaluate()
                metrics["eval_loss"] = self.last_eval_loss
            self._record(metrics, progress)
            progress.update(1)

            if (config.save_every and self.step % config.save_every == 0) or at_end:
                self._save_checkpoint()

        progress.close()
        final_dir = self._save_final() if self.step == config.steps else None
        return TrainResult(
            out=config.out,
            step=self.step,
            final_dir=final_dir,
            last_checkpoint=self.last_checkpoint,
            loss=self.last_loss,
            eval_loss=self.last_eval_loss,
            trainable_parameters=self.trainable_parameters,
        )


def format_metrics(metrics: dict[str, Any], total_steps: int) -> str:
    """Format one metrics record as a single human-readable line."""
    parts = [f"step {metrics['step']}/{total_steps}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
        parts.append(f"lr {metrics['lr']:.3e}")
        parts.append(f"grad_norm {metrics['grad_norm']:.3f}")
    parts.append(f"tokens {metrics['tokens']}")
    parts.append(f"elapsed {metrics['elapsed']:.1f}s")
    if "eval_loss" in metrics:
        parts.append(f"eval_loss {metrics['eval_loss']:.4f}")
    return "  ".join(parts)


def train(config: TrainConfig) -> TrainResult:
    """Run training with `config`; under `torchrun` every process calls this."""
    return TrainingRun(config).run()


def iter_metrics(run_folder: Path) -> Iterator[dict[str, Any]]:
    """Yield the records of a run's metrics.jsonl."""
    with (run_folder / METRICS_NAME).open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)
