"""Move tensor data into an open shard file: byte-range copies, zeros and computed chunks.

Memory stays bounded: copies go through the kernel (copy_file_range) or a fixed
buffer, zeros come from one shared buffer, and computed tensors are produced in
blocks of rows of at most COMPUTE_CHUNK_BYTES.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Iterator

import numpy as np

from surgeon.dtypes import encode
from surgeon.errors import PlanError
from surgeon.plan.expressions import ByteRange, TensorExpr

COPY_BUFFER_BYTES = 8 * 2**20
COMPUTE_CHUNK_BYTES = 16 * 2**20
# Largest finite magnitude of each float dtype; a computed value beyond it would be written as inf.
FINITE_LIMITS = {"F16": 65504.0, "BF16": 3.3895313892515355e38, "F32": 3.4028234663852886e38, "F64": 1.7976931348623157e308}
_ZERO_BUFFER = bytes(COPY_BUFFER_BYTES)
_KERNEL_COPY_UNAVAILABLE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}

Progress = Callable[[int], None]


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def copy_range(source: ByteRange, fd: int, offset: int, progress: Progress) -> None:
    """Copy an input byte range to `offset` in the output, in the kernel where possible."""
    source_fd = source.checkpoint.descriptor(source.info.shard)
    read_at = source.info.offset + source.start
    remaining = source.length
    kernel_copy = hasattr(os, "copy_file_range")

    while remaining:
        step = min(remaining, 1 << 30)
        copied = 0
        if kernel_copy:
            try:
                copied = os.copy_file_range(source_fd, fd, step, read_at, offset)
            except OSError as error:
                if error.errno not in _KERNEL_COPY_UNAVAILABLE:
                    raise
                kernel_copy = False
        if not kernel_copy:
            data = os.pread(source_fd, min(step, COPY_BUFFER_BYTES), read_at)
            _write_all(fd, data, offset)
            copied = len(data)
        if copied == 0:
            raise EOFError(f"{source.info.shard}: unexpected end of file reading tensor {source.info.name}")
        read_at += copied
        offset += copied
        remaining -= copied
        progress(copied)


def write_zeros(length: int, fd: int, offset: int, progress: Progress) -> None:
    """Leave `length` bytes at `offset` as a hole, which reads as zeros and takes no disk space.

    The contract: the writer sized the shard with ftruncate before writing anything,
    so every byte it has not written yet is already zero.
    """
    progress(length)


def computed_chunks(expr: TensorExpr) -> Iterator[bytes]:
    """Compute a tensor block by block of leading-dimension rows and return each block's encoded bytes."""
    row_bytes = max(1, expr.row_elements * 4)
    rows_per_chunk = max(1, COMPUTE_CHUNK_BYTES // row_bytes)
    limit = FINITE_LIMITS.get(expr.dtype)
    for start in range(0, expr.rows if expr.numel else 0, rows_per_chunk):
        stop = min(start + rows_per_chunk, expr.rows)
        with np.errstate(over="ignore", invalid="ignore"):
            values = expr.read_rows(start, stop)
            magnitude = float(np.max(np.abs(values))) if values.size else 0.0
        if limit is not None and not magnitude <= limit:
            raise PlanError(
                f"computed values reach {magnitude:g} in rows {start}..{stop - 1}, which {expr.dtype} cannot hold ({expr.describe()})",
                value=magnitude,
                fix="use a smaller scale factor or noise, or a wider output dtype",
            )
        yield encode(values, expr.dtype)


def write_computed(expr: TensorExpr, fd: int, offset: int, progress: Progress) -> None:
    """Compute a tensor block by block of leading-dimension rows and write each block."""
    for data in computed_chunks(expr):
        _write_all(fd, data, offset)
        offset += len(data)
        progress(len(data))


def expected_chunks(expr: TensorExpr) -> Iterator[bytes]:
    """Return a tensor's data in blocks, by the same route `write_tensor` takes, for checking a written copy."""
    source = expr.byte_range()
    if source is not None:
        for start in range(0, source.length, COPY_BUFFER_BYTES):
            length = min(COPY_BUFFER_BYTES, source.length - start)
            yield source.checkpoint.read(source.info, source.start + start, length)
    elif expr.is_zeros():
        for start in range(0, expr.nbytes, COPY_BUFFER_BYTES):
            yield _ZERO_BUFFER[: min(COPY_BUFFER_BYTES, expr.nbytes - start)]
    else:
        yield from computed_chunks(expr)


def write_tensor(expr: TensorExpr, fd: int, offset: int, progress: Progress) -> None:
    """Write one planned tensor's data at `offset`, by the cheapest route its expression allows."""
    parts = expr.parts()
    if parts is not None:
        for part in parts:
            write_tensor(part, fd, offset, progress)
            offset += part.nbytes
        return
    source = expr.byte_range()
    if source is not None:
        copy_range(source, fd, offset, progress)
    elif expr.is_zeros():
        write_zeros(expr.nbytes, fd, offset, progress)
    else:
        write_computed(expr, fd, offset, progress)


def contiguous_runs(tensors: list) -> list[list]:
    """Group consecutive planned tensors whose input bytes follow each other in one shard.

    A run is written with one kernel copy, which is faster than one copy per
    tensor. Every tensor that is not a plain byte copy forms a run of its own.
    """
    runs: list[list] = []
    previous_end = None
    for tensor in tensors:
        source = tensor.expr.byte_range() if tensor.expr.parts() is None else None
        start = (source.checkpoint, source.info.shard, source.info.offset + source.start) if source else None
        if source is not None and runs and start == previous_end:
            runs[-1].append(tensor)
        else:
            runs.append([tensor])
        previous_end = (source.checkpoint, source.info.shard, source.info.offset + source.start + source.length) if source else None
    return runs


def merged_range(run: list) -> ByteRange:
    """Return the single input byte range that a run of contiguous byte copies reads."""
    first = run[0].expr.byte_range()
    return ByteRange(first.checkpoint, first.info, first.start, sum(tensor.expr.nbytes for tensor in run))
