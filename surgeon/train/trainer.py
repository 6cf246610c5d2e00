"""Train a causal LM checkpoint: run settings, optimizer, learning-rate schedule and the loop with resume.

One process, DDP and FSDP2 under `torchrun` share one loop. Every optimizer step
reads a global batch of per-process batch × world size × gradient accumulation
windows, split over ranks as `PackedWindows.micro_batch` describes.

Parameter selection, the process group and checkpoint files are in the
`selection`, `distributed` and `checkpoints` modules.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from surgeon.errors import TrainingError
from surgeon.train.checkpoints import (
    CHECKPOINT_PREFIX,
    METRICS_NAME,
    OPTIMIZER_NAME,
    RUN_CONFIG_NAME,
    SCHEDULER_NAME,
    TRAINER_STATE_NAME,
    capture_rng_state,
    find_latest_checkpoint,
    gather_full_state,
    read_checkpoint_dtype,
    restore_rng_state,
    save_model_folder,
    seed_everything,
)
from surgeon.train.data import BatchLayout, PackedWindows, fingerprint_windows, pack_windows, read_documents, tokenize_documents
from surgeon.train.distributed import all_reduce_mean, enable_activation_checkpointing, gradient_sync, start_process_group, unwrap_model, wrap_model
from surgeon.train.evaluate import (
    autocast_context,
    choose_autocast_dtype,
    evaluate_model,
    load_causal_lm,
    load_eval_windows,
    load_tokenizer,
)
from surgeon.train.selection import select_trainable_parameters

logger = logging.getLogger(__name__)

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
