"""Held-out loss, perplexity and throughput of a causal language model.

Also contains the device, precision and loading helpers that training shares.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ContextManager, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from surgeon.errors import TrainingError
from surgeon.train.data import batch_windows, read_documents, split_eval_windows, tokenize_documents

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")


def choose_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """Return the device to run on: with `auto`, CUDA device `local_rank` when CUDA is available, else the CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")

    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("CUDA was requested but is not available", field="device", value=requested, fix="use --device cpu")
    return device


def choose_autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Return the autocast dtype, or None for plain float32.

    `auto` picks bfloat16 on CUDA devices that support it and float32 elsewhere,
    because bfloat16 autocast on CPUs without bf16 matrix units is slower than float32.
    """
    if precision not in PRECISIONS:
        raise TrainingError("unknown precision", field="precision", value=precision, fix="use auto, bf16 or fp32")

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast_context(device: torch.device, autocast_dtype: torch.dtype | None) -> ContextManager[Any]:
    """Return a `torch.autocast` context for `autocast_dtype`, or a no-op context for float32."""
    if autocast_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype)


def load_tokenizer(checkpoint: str | Path) -> Any:
    """Load the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint))
    except (OSError, ValueError) as error:
        raise TrainingError(
            f"cannot load a tokenizer: {error}",
            path=checkpoint,
            fix="copy the tokenizer files (tokenizer.json, tokenizer_config.json) into the checkpoint folder",
        ) from error


def load_causal_lm(checkpoint: str | Path, dtype: torch.dtype) -> Any:
    """Load a Hugging Face causal LM from a local folder in `dtype`."""
    from transformers import AutoModelForCausalLM

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise TrainingError("config.json not found", path=checkpoint, fix="pass a Hugging Face checkpoint folder")

    try:
        return AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise TrainingError(f"cannot load the model: {error}", path=checkpoint) from error


@dataclass(frozen=True)
class EvalResult:
    """Evaluation metrics; `loss` is the mean cross-entropy in nats over all scored tokens."""

    loss: float
    perplexity: float
    tokens: int
    windows: int
    seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def evaluate_model(
    model: Any,
    windows: Sequence[torch.Tensor],
    *,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> EvalResult:
    """Measure the mean token loss of `model` on `windows`, each window scored from its second token on.

    With several processes every rank takes every `world_size`-th batch and the
    sums are all-reduced. Ranks with one batch fewer run a batch with weight 0,
    because FSDP needs every rank in every forward pass. `tokens_per_second`
    counts the scored tokens of all ranks over this rank's wall time.
    """
    was_training = model.training
    model.eval()

    batches = batch_windows(windows, batch_size)
    rounds = math.ceil(len(batches) / world_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    token_count = torch.zeros((), dtype=torch.float64, device=device)

    started = time.perf_counter()
    for round_index in range(rounds):
        batch_index = round_index * world_size + rank
        counted = batch_index < len(batches)
        input_ids = batches[batch_index if counted else 0].to(device)

        with autocast_context(device, autocast_dtype):
            logits = model(input_ids=input_ids).logits
        losses = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            input_ids[:, 1:].reshape(-1),
            reduction="sum",
        )

        if counted:
            loss_sum += losses.double()
            token_count += input_ids[:, 1:].numel()

    if world_size > 1:
        dist.all_reduce(loss_sum)
        dist.all_reduce(token_count)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started

    model.train(was_training)

    mean_loss = (loss_sum / token_count).item()
    tokens = int(token_count.item())
    return EvalResult(
        loss=mean_loss,
        perplexity=math.exp(mean_loss) if mean_loss < 700 else math.inf,
        tokens=tokens,
        windows=len(windows),
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else math.inf,
    )


def load_eval_windows(tokenizer: Any, paths: Sequence[str | Path], seq_len: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Read, tokenise and window evaluation files; `max_windows` keeps only the first windows."""
    tokens = tokenize_documents(tokenizer, read_documents(paths))
    windows = split_eval_windows(tokens, seq_len)
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_paths: Sequence[str | Path],
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "auto",
    max_windows: int | None = None,
) -> EvalResult:
    """Load a checkpoint and its tokenizer and evaluate it on text or JSONL files in one process.

    The weights are loaded in the compute dtype (bfloat16 or float32), so no
    autocast is needed.
    """
    torch_device = choose_device(device)
    compute_dtype = choose_autocast_dtype(torch_device, precision) or torch.float32

    tokenizer = load_tokenizer(checkpoint)
    windows = load_eval_windows(tokenizer, data_paths, seq_len, max_windows)
    logger.info("evaluating %s on %d windows of up to %d tokens", checkpoint, len(windows), seq_len)

    model = load_causal_lm(checkpoint, compute_dtype).to(torch_device)
    return evaluate_model(model, windows, batch_size=batch_size, device=torch_device)
