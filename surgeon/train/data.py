"""Read text, tokenise it and cut the token stream into fixed-length windows.

Training packs all documents into one stream and cuts it into windows of
`seq_len` tokens, so no padding is needed. The order of windows and the share of
each process are pure functions of the seed and the step, which makes a resumed
run and a run with another world size see the same global batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from surgeon.errors import TrainingError

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_documents(paths: Sequence[str | Path]) -> list[str]:
    """Read documents from text files (one document each) or JSONL files (one per line, field `text`)."""
    documents: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise TrainingError("data file not found", path=path, fix="pass an existing text or JSONL file")

        if path.suffix.lower() in JSONL_SUFFIXES:
            documents.extend(_read_jsonl_texts(path))
        else:
            try:
                documents.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as error:
                raise TrainingError(
                    f"data file is not UTF-8 text (byte {error.start})",
                    path=path,
                    fix="pass plain text files or JSONL files with a `text` field",
                ) from error

    if not any(document.strip() for document in documents):
        raise TrainingError("the data files contain no text", value=[str(path) for path in paths])
    return documents


def _decoded_lines(lines, path: Path):
    """Yield the lines of a text file, turning a decoding failure into a TrainingError."""
    try:
        yield from lines
    except UnicodeDecodeError as error:
        raise TrainingError(f"data file is not UTF-8 text (byte {error.start})", path=path, fix="pass UTF-8 JSONL with a `text` field") from error


def _read_jsonl_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8", errors="strict") as lines:
        for line_number, line in enumerate(_decoded_lines(lines, path), start=1):
            if not line.strip():
                continue

            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TrainingError(f"invalid JSON: {error.msg}", path=path, line=line_number) from error

            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise TrainingError(
                    "each JSONL record needs a string field 'text'",
                    path=path,
                    line=line_number,
                    field="text",
                    fix="write one JSON object per line, such as {\"text\": \"...\"}",
                )
            texts.append(text)
    return texts


def tokenize_documents(tokenizer: Any, documents: Sequence[str]) -> torch.Tensor:
    """Tokenise each document with the tokenizer's own special tokens and join them into one 1-D int64 stream.

    An EOS token ends every document (unless the tokenizer already put one
    there), so that packed windows mark where one document stops.
    """
    eos_token_id = tokenizer.eos_token_id
    stream: list[int] = []
    for document in documents:
        token_ids = tokenizer(document, verbose=False)["input_ids"]
        if eos_token_id is not None and (not token_ids or token_ids[-1] != eos_token_id):
            token_ids = [*token_ids, eos_token_id]
        stream.extend(token_ids)
    return torch.tensor(stream, dtype=torch.long)


def pack_windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D token stream into a `[windows, seq_len]` tensor, dropping the tokens after the last full window."""
    if seq_len < 2:
        raise TrainingError("the sequence length must be at least 2 tokens", field="seq_len", value=seq_len)

    window_count = tokens.numel() // seq_len
    if window_count == 0:
        raise TrainingError(
            f"the data has {tokens.numel()} tokens, fewer than one window of {seq_len}",
            field="seq_len",
            value=seq_len,
            fix="add more text or lower --seq-len",
        )
    return tokens[: window_count * seq_len].view(window_count, seq_len).clone()


def split_eval_windows(tokens: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Cut a token stream into non-overlapping windows of `seq_len`, keeping a shorter last window of 2 tokens or more.

    Evaluation keeps the remainder so every token but the first of each window
    is scored once.
    """
    if seq_len < 2:
        raise TrainingError("the sequence length must be at least 2 tokens", field="seq_len", value=seq_len)

    windows = list(tokens.split(seq_len))
    if windows and windows[-1].numel() < 2:
        windows.pop()
    if not windows:
        raise TrainingError("the evaluation data has fewer than 2 tokens", fix="add more text")
    return windows


def batch_windows(windows: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Stack consecutive windows into `[batch, length]` tensors; a window of another length starts a new batch."""
    batches: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    for window in windows:
        if pending and (len(pending) == batch_size or window.numel() != pending[0].numel()):
            batches.append(torch.stack(pending))
            pending = []
        pending.append(window)
    if pending:
        batches.append(torch.stack(pending))
    return batches


def fingerprint_windows(windows: torch.Tensor) -> str:
    """Return a SHA-256 of the packed windows, stored in checkpoints to catch a resume on different data."""
    digest = hashlib.sha256()
    digest.update(str(tuple(windows.shape)).encode())
    digest.update(windows.contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class BatchLayout:
    """Split of one optimizer step's global batch of windows into micro-batches and processes."""

    per_process_batch: int
    world_size: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        """Windows per optimizer step: per-process batch × world size × gradient accumulation."""
        return self.per_process_batch * self.world_size * self.grad_accum


class PackedWindows:
    """Training windows in a seeded order that repeats for each epoch with a new shuffle.

    Position `p` in the endless stream is window `order(p // N)[p % N]`, so the
    only data state a checkpoint needs is the number of windows consumed.
    """

    def __init__(self, windows: torch.Tensor, seed: int) -> None:
        self.windows = windows
        self.seed = seed
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.windows.shape[0]

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Return the window permutation of one epoch; it depends only on the seed and the epoch."""
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self), generator=generator)}
        return self._orders[epoch]

    def window_indices(self, start: int, count: int) -> torch.Tensor:
        """Return the indices of `count` windows from stream position `start` on."""
        positions = torch.arange(start, start + count)
        indices = torch.empty(count, dtype=torch.long)
        for offset, position in enumerate(positions.tolist()):
            epoch, index = divmod(position, len(self))
            indices[offset] = self.epoch_order(epoch)[index]
        return indices

    def micro_batch(self, step_start: int, layout: BatchLayout, micro_step: int, rank: int) -> torch.Tensor:
        """Return this process's `[per_process_batch, seq_len]` windows for one micro-step.

        The step's global batch starts at stream position `step_start`. Micro-step
        `a` covers the slice `[a·B·W, (a+1)·B·W)` of it and rank `r` takes the
        `r`-th block of `B` there, so one process with batch `B·W` reads the
        same windows as `W` processes with batch `B`.
        """
        block_start = step_start + (micro_step * layout.world_size + rank) * layout.per_process_batch
        return self.windows[self.window_indices(block_start, layout.per_process_batch)]
