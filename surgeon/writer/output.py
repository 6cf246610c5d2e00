"""Write a Plan to an output folder safely.

The output is built in a hidden partial folder beside the target and renamed
into place only when every file is written and flushed, so an output folder
that exists is always complete. A journal in the partial folder lists the
shards already finished, which lets `resume=True` continue an interrupted run.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
from concurrent.futures import Future, ThreadPoolExecutor
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from surgeon.checkpoint import Checkpoint, open_checkpoint, read_header
from surgeon.checkpoint.reader import CONFIG_NAME, INDEX_NAME, PICKLE_SUFFIXES
from surgeon.errors import DiskFullError, HeaderError, OutputError, PlanError, ResumeError
from surgeon.plan import Plan, PlannedShard
from surgeon.writer.interrupt import interrupts_raise
from surgeon.writer.model_card import render_model_card
from surgeon.writer.tensor_data import contiguous_runs, copy_range, merged_range, write_tensor

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
# Seconds to sleep after each tensor, read from the environment. Tests set it so
# that a signal lands in the middle of a run; it is not meant for users.
THROTTLE_ENV = "SURGEON_TEST_THROTTLE"


@dataclass
class WriteOptions:
    """Options for `write_output`: replacing a target, resuming a partial folder, the space check and progress."""

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
    """Write every shard, the index, config, manifest, model card and copied files; return the folder.

    SIGINT and SIGTERM raise RunInterruptedError, and a full disk raises
    DiskFullError. Both leave the partial folder resumable with `resume=True`.
    """
    options = options or WriteOptions()
    output = Path(output).absolute()
    partial = partial_folder(output)
    if options.resume and not options.force and not partial.exists() and (output / MANIFEST_NAME).is_file():
        raise OutputError(
            "the output is already complete, so there is nothing to resume",
            path=output,
            fix=f"check it with `surgeon verify {output}`, or pass --force to build it again",
        )
    check_output_location(output, plan.inputs, options.force)
    base = plan.inputs[plan.base_model]
    file_mode = stat.S_IMODE((base.folder / CONFIG_NAME).stat().st_mode) & 0o666
    folder_mode = stat.S_IMODE(base.folder.stat().st_mode)
    side_files = list_side_files(plan.inputs[plan.tokenizer_model].folder)
    metadata_files = render_metadata_files(plan, options.base_model_ids, side_files)
    extra_bytes = sum(len(data) for data in metadata_files.values()) + sum(path.stat().st_size for path in side_files)

    stream = options.input_stream
    _create_parent(output)
    lock = _lock_partial(partial) if partial.exists() else None
    try:
        with interrupts_raise(partial) as guard:
            created = not partial.exists()
            finished = _prepare_partial(plan, partial, options.resume, folder_mode)
            if lock is None:
                lock = _lock_partial(partial)
            remaining = [shard for shard in plan.shards if shard.file_name not in finished]
            needed = sum(shard.size for shard in remaining) + extra_bytes
            if options.check_space:
                try:
                    check_free_space(output.parent, stream.predicted_peak_bytes + extra_bytes if stream else needed)
                except DiskFullError:
                    if created:
                        partial.rmdir()
                    raise

            plan_fingerprint = plan.fingerprint()
            stamps = {name: _stamp(partial / name) for name in finished}
            def finish_and_record(shard: PlannedShard, fd: int, still_needed: int) -> None:
                _finish_shard(shard, fd, partial, still_needed)
                finished.add(shard.file_name)
                stamps[shard.file_name] = _stamp(partial / shard.file_name)
                journal = {"plan": plan_fingerprint, "finished": sorted(finished), "stamps": stamps}
                _guard_disk_full(lambda: _write_json(partial / JOURNAL_NAME, journal, file_mode), partial, still_needed)

            # One worker flushes shard k to disk while this thread writes shard k + 1, so at most
            # one shard waits for its flush and the disk's writeback overlaps the copying.
            with tqdm(total=needed - extra_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="writing", disable=not options.progress) as bar, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgeon-flush") as flusher:
                flushing: Future | None = None
                for shard in remaining:
                    fd = _write_shard_data(shard, partial, file_mode, bar.update, needed, stream)
                    needed -= shard.size
                    if flushing is not None:
                        flushing.result()
                    flushing = flusher.submit(finish_and_record, shard, fd, needed + shard.size)
                if flushing is not None:
                    flushing.result()

            _guard_disk_full(lambda: _write_metadata_files(metadata_files, side_files, partial, file_mode), partial, needed)
            _check_inputs_unchanged(plan, stream.models if stream else set())
            if stream:
                stream.finish()
            guard.finish_uninterrupted()
            (partial / JOURNAL_NAME).unlink()
            _fsync_folder(partial)
            _move_into_place(partial, output)
    finally:
        if lock is not None:
            os.close(lock)
    logger.info("wrote %s (%d shards, %d bytes)", output, len(plan.shards), plan.output_bytes)
    return output


def check_output_location(output: Path, inputs: dict[str, Checkpoint], force: bool) -> None:
    """Reject an output that overlaps an input, or a non-empty one unless `force`."""
    for written in (output, partial_folder(output)):
        resolved = written.resolve()
        for checkpoint in inputs.values():
            source = checkpoint.folder.resolve()
            if resolved == source or resolved.is_relative_to(source) or source.is_relative_to(resolved):
                raise OutputError(
                    f"output folder {written} overlaps the input folder {checkpoint.folder}",
                    path=output,
                    fix="choose an output folder outside the input folder, and not one that contains it",
                )
    if output.exists() and not output.is_dir():
        raise OutputError("output path exists and is not a folder", path=output, fix="choose another output path")
    if output.is_dir() and any(output.iterdir()):
        if not force:
            raise OutputError("output folder exists and is not empty", path=output, fix="pass --force to replace it, or choose another folder")
        if not (output / MANIFEST_NAME).is_file():
            raise OutputError(
                f"output folder is not empty and has no {MANIFEST_NAME}, so surgeon did not write it; --force replaces only surgeon outputs",
                path=output,
                fix="delete the folder yourself if you mean to replace it, or choose another folder",
            )


def check_free_space(folder: Path, needed: int) -> None:
    """Reject a run whose remaining output (`needed` bytes) does not fit in the free space at `folder`."""
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
        try:
            partial.mkdir(mode=0o700)
            os.chmod(partial, folder_mode)
        except OSError as error:
            raise OutputError(
                f"cannot create the partial output folder: {error.strerror}",
                path=partial,
                fix=f"make {partial.parent} writable, or choose another output folder",
            ) from error
        return set()

    journal = _read_journal(plan, partial)
    if journal.get("plan") != plan.fingerprint():
        raise ResumeError(
            "the partial output was written by a different recipe, input or shard size",
            path=partial,
            fix=f"rerun with the original recipe and inputs, or delete {partial} to start over",
        )
    for leftover in partial.glob("*.tmp"):
        leftover.unlink()
    finished = set()
    for shard in plan.shards:
        path = partial / shard.file_name
        recorded = journal.get("stamps", {}).get(shard.file_name)
        if shard.file_name in journal.get("finished", []) and path.is_file() and recorded == _stamp(path):
            with open(path, "rb") as handle:
                if handle.read(len(shard.header)) == shard.header:
                    finished.add(shard.file_name)
    logger.info("resuming: %d of %d shards already written", len(finished), len(plan.shards))
    return finished


def _stamp(path: Path) -> list[int]:
    """Return a finished shard's size and modification time; a shard changed since it was written fails the match."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def _create_parent(output: Path) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create the output's parent folder: {error.strerror}",
            path=output.parent,
            fix="choose an output folder in a writable location",
        ) from error


def _lock_partial(partial: Path) -> int:
    """Lock the partial folder for this run; the lock ends when the process does, however it ends."""
    descriptor = os.open(partial, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise OutputError(
            "another surgeon run is writing this output now",
            path=partial,
            fix="wait for that run to finish, or stop it and rerun with --resume",
        ) from None
    return descriptor


def _read_journal(plan: Plan, partial: Path) -> dict:
    """Return the journal; a run killed before its first shard finished has none, which means nothing is finished."""
    journal_path = partial / JOURNAL_NAME
    if not journal_path.is_file():
        return {"plan": plan.fingerprint(), "finished": []}
    try:
        journal = json.loads(journal_path.read_bytes())
    except ValueError as error:
        raise ResumeError(
            f"the journal is not valid JSON ({error})",
            path=journal_path,
            fix=f"delete {partial} and run again without --resume",
        ) from error
    if not isinstance(journal, dict) or not isinstance(journal.get("finished", []), list):
        raise ResumeError("the journal is not a surgeon journal", path=journal_path, fix=f"delete {partial} and run again without --resume")
    return journal


def _write_shard_data(shard: PlannedShard, partial: Path, file_mode: int, progress, needed: int, stream: StreamedInputs | None) -> int:
    """Write one shard's header and data to its `.tmp` file and return the open descriptor, not yet flushed.

    On any failure the `.tmp` file is removed, so a full disk gets its space back
    and the partial folder holds only finished shards.
    """
    temporary = partial / (shard.file_name + ".tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
    try:
        # Sizing the file first makes every unwritten byte a zero, so zero tensors need no writes.
        _guard_disk_full(lambda: os.ftruncate(fd, shard.size), partial, needed)
        _guard_disk_full(lambda: _fill_shard(shard, fd, progress, stream), partial, needed)
        os.fchmod(fd, file_mode)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    return fd


def _finish_shard(shard: PlannedShard, fd: int, partial: Path, needed: int) -> None:
    """Flush a written shard, check its header and size, then rename it to its final name."""
    temporary = partial / (shard.file_name + ".tmp")
    try:
        try:
            _guard_disk_full(lambda: os.fsync(fd), partial, needed)
        finally:
            os.close(fd)
        check_written_shard(temporary, shard)
        os.replace(temporary, partial / shard.file_name)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def check_written_shard(path: Path, shard: PlannedShard) -> None:
    """Re-read a written shard's header and size and compare them with the plan."""
    try:
        written = read_header(path)
    except HeaderError as error:
        raise OutputError(f"shard {shard.file_name} is invalid after writing: {error.message}", path=path, fix="check the disk, then rerun with --resume") from error
    if written.file_size != shard.size:
        raise OutputError(
            f"shard {shard.file_name} is {written.file_size} bytes after writing, planned {shard.size}",
            path=path,
            fix="check the disk, then rerun with --resume",
        )
    if 8 + len(written.header_bytes) != len(shard.header) or written.header_bytes != shard.header[8:]:
        raise OutputError(f"shard {shard.file_name} header differs from the planned header after writing", path=path, fix="check the disk, then rerun with --resume")


def _fill_shard(shard: PlannedShard, fd: int, progress, stream: StreamedInputs | None) -> None:
    throttle = float(os.environ.get(THROTTLE_ENV) or 0)
    os.pwrite(fd, shard.header, 0)
    offset = len(shard.header)
    for run in contiguous_runs(shard.tensors):
        if stream:
            for tensor in run:
                stream.before_tensor(tensor)
        if len(run) == 1:
            try:
                write_tensor(run[0].expr, fd, offset, progress)
            except PlanError as error:
                error.tensor = error.tensor or run[0].name
                raise
        else:
            copy_range(merged_range(run), fd, offset, progress)
        if stream:
            for tensor in run:
                stream.after_tensor(tensor)
        offset += sum(tensor.expr.nbytes for tensor in run)
        if throttle:
            time.sleep(throttle * len(run))


def _guard_disk_full(action, partial: Path, needed: int) -> None:
    """Run `action`, turning ENOSPC or EDQUOT into a DiskFullError that states the `needed` bytes."""
    try:
        action()
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(partial).free
            raise DiskFullError(
                f"disk full while writing: the rest of the output needs {needed:,} bytes and {free:,} bytes are free",
                path=partial,
                needed_bytes=needed,
                free_bytes=free,
                fix=f"free at least {needed:,} bytes and rerun with --resume (finished shards are kept), or delete {partial}",
            ) from error
        raise


def _json_bytes(data: object) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()


def _write_json(path: Path, data: object, file_mode: int) -> None:
    _write_bytes(path, _json_bytes(data), file_mode)


def _write_bytes(path: Path, data: bytes, file_mode: int) -> None:
    """Write a small file atomically: to a temporary name, flushed, then renamed; a failed write leaves no file."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode)
    try:
        try:
            _write_all(fd, data)
            os.fchmod(fd, file_mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def render_metadata_files(plan: Plan, base_model_ids: list[str] | None, side_files: list[Path]) -> dict[str, bytes]:
    """Return the index, config.json, README.md and surgeon.json contents, by file name.

    surgeon.json lists the SHA-256 of every other file of the output except the
    shards (whose headers it hashes), so `surgeon verify` can check them all.
    """
    weight_map = {tensor.name: shard.file_name for shard in plan.shards for tensor in shard.tensors}
    files = {
        INDEX_NAME: _json_bytes({"metadata": {"total_size": plan.total_size}, "weight_map": weight_map}),
        CONFIG_NAME: _json_bytes(plan.config),
        MODEL_CARD_NAME: render_model_card(plan, base_model_ids).encode(),
    }
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    for path in side_files:
        digests[path.name] = file_sha256(path)
    manifest = plan.manifest()
    manifest["output"]["files"] = dict(sorted(digests.items()))
    files[MANIFEST_NAME] = _json_bytes(manifest)
    return files


def file_sha256(path: Path) -> str:
    """Return a file's SHA-256 in hex, reading it in fixed-size blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def _write_metadata_files(files: dict[str, bytes], side_files: list[Path], partial: Path, file_mode: int) -> None:
    for name, data in files.items():
        _write_bytes(partial / name, data, file_mode)
    for path in side_files:
        _copy_side_file(path, partial)


def list_side_files(source: Path) -> list[Path]:
    """Return every top-level non-weight file (tokenizer, chat template, generation config) to copy byte for byte."""
    side_files = []
    roots = [root for root in (source.resolve(), _hub_blobs_folder(source)) if root is not None]
    for path in sorted(source.iterdir()):
        name = path.name
        # An index of weights in another format (pytorch_model.bin.index.json) would point at files the output lacks.
        if name.startswith(".") or name in WRITTEN_NAMES or path.suffix in SKIPPED_SUFFIXES or name.endswith(".index.json"):
            continue
        if not path.is_file():
            logger.info("not copying %s: only top-level files are copied", path)
            continue
        if not any(path.resolve().is_relative_to(root) for root in roots):
            logger.warning("not copying %s: it links to %s, outside the input folder", path, path.resolve())
            continue
        side_files.append(path)
    return side_files


def _hub_blobs_folder(folder: Path) -> Path | None:
    """Return the blobs folder of a Hugging Face Hub cache snapshot, whose files link there."""
    resolved = folder.resolve()
    return resolved.parent.parent / "blobs" if resolved.parent.name == "snapshots" else None


def copy_side_files(source: Path, destination: Path) -> list[str]:
    """Copy every top-level non-weight file byte for byte; return their names."""
    side_files = list_side_files(source)
    for path in side_files:
        _copy_side_file(path, destination)
    return [path.name for path in side_files]


def _copy_side_file(path: Path, destination: Path) -> None:
    shutil.copyfile(path, destination / path.name)
    os.chmod(destination / path.name, stat.S_IMODE(path.stat().st_mode))


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
