"""Write a Plan to an output folder safely.

The output is built in a hidden partial folder beside the target and renamed
into place only when every file is written and flushed, so an output folder
that exists is always complete. A journal in the partial folder lists the
shards already finished, which lets `resume=True` continue an interrupted run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from surgeon.checkpoint import Checkpoint, open_checkpoint
from surgeon.checkpoint.reader import CONFIG_NAME, INDEX_NAME, PICKLE_SUFFIXES
from surgeon.errors import DiskFullError, OutputError, ResumeError
from surgeon.plan import Plan, PlannedShard
from surgeon.writer.model_card import render_model_card
from surgeon.writer.tensor_data import write_tensor

if TYPE_CHECKING:
    from surgeon.streamed_inputs import StreamedInputs

logger = logging.getLogger(__name__)

MANIFEST_NAME = "surgeon.json"
MODEL_CARD_NAME = "README.md"
JOURNAL_NAME = ".surgeon-journal.json"
PARTIAL_SUFFIX = ".surgeon-partial"
# Files never copied from the input: weights in other formats, and files surgeon writes itself.
SKIPPED_SUFFIXES = PICKLE_SUFFIXES + (".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", ".ot")
WRITTEN_NAMES = {CONFIG_NAME, INDEX_NAME, MANIFEST_NAME, MODEL_CARD_NAME}


@dataclass
class WriteOptions:
    """How `write_output` treats an existing target, a partial folder, free space and progress."""

    force: bool = False
    resume: bool = False
    check_space: bool = True
    progress: bool = True
    base_model_ids: list[str] | None = None
    # Hub inputs whose shards are downloaded before and deleted after the tensors that read them.
    input_stream: StreamedInputs | None = None


def partial_folder(output: Path) -> Path:
    return output.parent / f".{output.name}{PARTIAL_SUFFIX}"


def write_output(plan: Plan, output: str | Path, options: WriteOptions | None = None) -> Path:
    """Write every shard, the index, config, manifest, model card and copied files; return the folder."""
    options = options or WriteOptions()
    output = Path(output).absolute()
    check_output_location(output, plan.inputs, options.force)
    partial = partial_folder(output)
    base = plan.inputs[plan.base_model]
    file_mode = stat.S_IMODE((base.folder / CONFIG_NAME).stat().st_mode) & 0o666
    folder_mode = stat.S_IMODE(base.folder.stat().st_mode)

    finished = _prepare_partial(plan, partial, options.resume, folder_mode)
    remaining = [shard for shard in plan.shards if shard.file_name not in finished]
    stream = options.input_stream
    if options.check_space:
        needed = stream.predicted_peak_bytes if stream else sum(shard.size for shard in remaining)
        check_free_space(partial, needed, options.resume)

    total = sum(shard.size for shard in remaining)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing", disable=not options.progress) as bar:
        for shard in remaining:
            _write_shard(shard, partial, file_mode, bar.update, stream)
            finished.add(shard.file_name)
            _write_json(partial / JOURNAL_NAME, {"plan": plan.fingerprint(), "finished": sorted(finished)}, file_mode)

    _write_metadata_files(plan, partial, file_mode, options.base_model_ids)
    _check_inputs_unchanged(plan, stream.models if stream else set())
    if stream:
        stream.finish()
    (partial / JOURNAL_NAME).unlink()
    _fsync_folder(partial)
    _move_into_place(partial, output)
    logger.info("wrote %s (%d shards, %d bytes)", output, len(plan.shards), plan.output_bytes)
    return output


def check_output_location(output: Path, inputs: dict[str, Checkpoint], force: bool) -> None:
    """Reject an output that overlaps an input, or a non-empty one unless `force`."""
    resolved = output.resolve()
    for checkpoint in inputs.values():
        source = checkpoint.folder.resolve()
        if resolved == source or resolved.is_relative_to(source) or source.is_relative_to(resolved):
            raise OutputError(
                f"output folder overlaps the input folder {checkpoint.folder}",
                path=output,
                fix="choose an output folder outside the input folder, and not one that contains it",
            )
    if output.exists() and not output.is_dir():
        raise OutputError("output path exists and is not a folder", path=output, fix="choose another output path")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise OutputError("output folder exists and is not empty", path=output, fix="pass --force to replace it, or choose another folder")


def check_free_space(folder: Path, needed: int, resume: bool) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DiskFullError(
            f"the output needs {needed:,} bytes but only {free:,} bytes are free",
            path=folder,
            needed_bytes=needed,
            free_bytes=free,
            fix="free disk space or choose another output folder; pass --no-space-check to try anyway",
        )


def _prepare_partial(plan: Plan, partial: Path, resume: bool, folder_mode: int) -> set[str]:
    """Create or reopen the partial folder; return the names of shards already finished."""
    if partial.exists() and not resume:
        raise ResumeError(
            "a partial output from an interrupted run exists",
            path=partial,
            fix=f"pass --resume to finish it, or delete {partial} to start over",
        )
    if not partial.exists():
        partial.mkdir(mode=0o700)
        os.chmod(partial, folder_mode)
        return set()

    journal_path = partial / JOURNAL_NAME
    journal = json.loads(journal_path.read_text()) if journal_path.is_file() else {"plan": plan.fingerprint(), "finished": []}
    if journal.get("plan") != plan.fingerprint():
        raise ResumeError(
            "the partial output was written by a different recipe, input or shard size",
            path=partial,
            fix=f"rerun with the original recipe and inputs, or delete {partial} to start over",
        )
    finished = set()
    for shard in plan.shards:
        path = partial / shard.file_name
        if shard.file_name in journal.get("finished", []) and path.is_file() and path.stat().st_size == shard.size:
            with open(path, "rb") as handle:
                if handle.read(len(shard.header)) == shard.header:
                    finished.add(shard.file_name)
    logger.info("resuming: %d of %d shards already written", len(finished), len(plan.shards))
    return finished


def _write_shard(shard: PlannedShard, partial: Path, file_mode: int, progress, stream: StreamedInputs | None) -> None:
    """Write one shard to a `.tmp` file, flush it, then rename it to its final name."""
    target = partial / shard.file_name
    temporary = target.with_name(target.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode)
    try:
        _guard_disk_full(lambda: _fill_shard(shard, fd, progress, stream), partial, shard.size)
        os.fchmod(fd, file_mode)
    finally:
        os.close(fd)
    os.replace(temporary, target)


def _fill_shard(shard: PlannedShard, fd: int, progress, stream: StreamedInputs | None) -> None:
    os.pwrite(fd, shard.header, 0)
    offset = len(shard.header)
    for tensor in shard.tensors:
        if stream:
            stream.before_tensor(tensor)
        write_tensor(tensor.expr, fd, offset, progress)
        if stream:
            stream.after_tensor(tensor)
        offset += tensor.expr.nbytes
    os.fsync(fd)


def _guard_disk_full(action, partial: Path, needed: int) -> None:
    try:
        action()
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"disk full while writing: this shard needs {needed:,} bytes",
                path=partial,
                needed_bytes=needed,
                fix=f"free space and rerun with --resume (finished shards are kept), or delete {partial}",
            ) from error
        raise


def _write_json(path: Path, data: object, file_mode: int) -> None:
    _write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode(), file_mode)


def _write_bytes(path: Path, data: bytes, file_mode: int) -> None:
    """Write a small file atomically: to a temporary name, flushed, then renamed."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, file_mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def _write_metadata_files(plan: Plan, partial: Path, file_mode: int, base_model_ids: list[str] | None) -> None:
    def write_all() -> None:
        weight_map = {tensor.name: shard.file_name for shard in plan.shards for tensor in shard.tensors}
        _write_json(partial / INDEX_NAME, {"metadata": {"total_size": plan.total_size}, "weight_map": weight_map}, file_mode)
        _write_json(partial / CONFIG_NAME, plan.config, file_mode)
        _write_json(partial / MANIFEST_NAME, plan.manifest(), file_mode)
        _write_bytes(partial / MODEL_CARD_NAME, render_model_card(plan, base_model_ids).encode(), file_mode)
        copy_side_files(plan.inputs[plan.tokenizer_model].folder, partial)

    _guard_disk_full(write_all, partial, 0)


def copy_side_files(source: Path, destination: Path) -> list[str]:
    """Copy every top-level non-weight file (tokenizer, chat template, generation config) byte for byte."""
    copied = []
    for path in sorted(source.iterdir()):
        name = path.name
        if name.startswith(".") or name in WRITTEN_NAMES or path.suffix in SKIPPED_SUFFIXES:
            continue
        if not path.is_file():
            logger.info("not copying %s: only top-level files are copied", path)
            continue
        shutil.copyfile(path, destination / name)
        os.chmod(destination / name, stat.S_IMODE(path.stat().st_mode))
        copied.append(name)
    return copied


def _check_inputs_unchanged(plan: Plan, streamed: set[str]) -> None:
    """Re-read every local input's headers: a shard that changed during the run makes the output suspect.

    Streamed inputs are pinned to a Hub commit and each shard is checked against
    its planned header on download, so they are skipped here.
    """
    for key, checkpoint in plan.inputs.items():
        if key in streamed:
            continue
        if open_checkpoint(checkpoint.folder, allowed_root=checkpoint.allowed_root).fingerprint() != checkpoint.fingerprint():
            raise OutputError(
                f"input {key!r} changed while surgeon was writing",
                path=checkpoint.folder,
                fix="make sure nothing writes to the input folder, then rerun",
            )


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(partial: Path, output: Path) -> None:
    """Rename the finished partial folder to the target, replacing an old output only now."""
    if output.exists():
        retired = output.parent / f".{output.name}.surgeon-replaced"
        if retired.exists():
            shutil.rmtree(retired)
        os.replace(output, retired)
        os.replace(partial, output)
        shutil.rmtree(retired)
    else:
        os.replace(partial, output)
    _fsync_folder(output.parent)
