"""Every exception surgeon raises on purpose.

Each error carries the offending value and the fix as structured fields, so the
CLI can print one line and an API caller can act on the fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


class SurgeonError(Exception):
    """Base class: a message plus where it happened and what to do about it."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        tensor: str | None = None,
        field: str | None = None,
        line: int | None = None,
        value: Any = None,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        self.field = field
        self.line = line
        self.value = value
        self.fix = fix
        super().__init__(str(self))

    def location(self) -> str:
        parts = []
        if self.path:
            parts.append(self.path if self.line is None else f"{self.path}:{self.line}")
        if self.field:
            parts.append(f"field '{self.field}'")
        if self.tensor:
            parts.append(f"tensor '{self.tensor}'")
        return ", ".join(parts)

    def __str__(self) -> str:
        text = self.message
        where = self.location()
        if where:
            text = f"{where}: {text}"
        if self.fix:
            text = f"{text}. Fix: {self.fix}"
        return text


class CheckpointError(SurgeonError):
    """An input checkpoint folder is missing files or has inconsistent files."""


class HeaderError(CheckpointError):
    """A safetensors shard header is malformed or describes impossible data."""


class ShardIndexError(CheckpointError):
    """`model.safetensors.index.json` disagrees with the shards beside it."""


class ConfigError(CheckpointError):
    """`config.json` is missing or disagrees with the tensors present."""


class PickleWeightsError(CheckpointError):
    """The folder holds only pickled weights (.bin, .pt, .pth), which surgeon never loads."""


class ArchitectureError(SurgeonError):
    """The model's architecture is unknown, or cannot take the requested step."""


class RecipeError(SurgeonError):
    """A recipe file is invalid: wrong field, wrong value, or a step that cannot apply."""

    def __init__(self, message: str, *, choices: Sequence[str] | None = None, **kwargs: Any) -> None:
        self.choices = list(choices) if choices else None
        if self.choices and not kwargs.get("fix"):
            kwargs["fix"] = "use one of: " + ", ".join(self.choices)
        super().__init__(message, **kwargs)


class PlanError(SurgeonError):
    """The recipe is valid but cannot be compiled against these input checkpoints."""


class OutputError(SurgeonError):
    """The output folder cannot be written safely."""


class DiskFullError(OutputError):
    """The output does not fit on its file system."""

    def __init__(self, message: str, *, needed_bytes: int, free_bytes: int | None = None, **kwargs: Any) -> None:
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
        super().__init__(message, **kwargs)


class RunInterruptedError(OutputError):
    """SIGINT or SIGTERM stopped a run; the partial output keeps every finished shard."""

    def __init__(self, message: str, *, signal_number: int, **kwargs: Any) -> None:
        self.signal_number = signal_number
        super().__init__(message, **kwargs)

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: 128 + the signal number."""
        return 128 + self.signal_number


class ResumeError(OutputError):
    """A partial output cannot be resumed with this recipe and these inputs."""


class VerifyError(SurgeonError):
    """A finished output no longer matches its `surgeon.json` manifest."""


class TrainingError(SurgeonError):
    """A training or evaluation run cannot start or continue with these inputs."""


class HubError(SurgeonError):
    """A Hugging Face Hub reference cannot be resolved, downloaded or pushed."""
