"""Parse and validate one safetensors shard header without reading tensor data.

Format: 8-byte little-endian header length N, then N bytes of UTF-8 JSON, then
the data area. Every tensor's `data_offsets` are relative to the data area, and
the tensors must cover it exactly: no overlap, no gap, nothing left over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from surgeon.dtypes import DTYPE_SIZES
from surgeon.errors import HeaderError

# The reference implementation rejects headers above this size too.
MAX_HEADER_BYTES = 100_000_000
MAX_TENSOR_BYTES = 2**63 - 1
_METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """Location of one tensor: its shard and the absolute byte range inside it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ShardHeader:
    """One parsed shard: its tensors in file order, its metadata and the raw header bytes."""

    path: Path
    file_size: int
    header_bytes: bytes
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + len(self.header_bytes)

    def fingerprint(self) -> str:
        """Hash of the size and header: changes when the shard's layout or length changes."""
        digest = hashlib.sha256()
        digest.update(str(self.file_size).encode())
        digest.update(self.header_bytes)
        return digest.hexdigest()


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise HeaderError("duplicate tensor name in header", tensor=key, fix="re-export the shard")
        seen[key] = value
    return seen


def read_header(path: Path) -> ShardHeader:
    """Read and validate the header of the safetensors file at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        raise HeaderError(f"cannot open shard: {error.strerror}", path=path, fix="check the file exists and is readable") from error
    try:
        file_size = os.fstat(fd).st_size
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise HeaderError(
                f"file is {file_size} bytes, shorter than the 8-byte header length prefix",
                path=path,
                fix="the shard is truncated; download or copy it again",
            )
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > MAX_HEADER_BYTES:
            raise HeaderError(
                f"header length {header_length} exceeds the {MAX_HEADER_BYTES}-byte limit",
                path=path,
                value=header_length,
                fix="the file is not a safetensors shard or is corrupt",
            )
        if 8 + header_length > file_size:
            raise HeaderError(
                f"header length {header_length} runs past the end of the {file_size}-byte file",
                path=path,
                value=header_length,
                fix="the shard is truncated; download or copy it again",
            )
        header_bytes = os.pread(fd, header_length, 8)
    finally:
        os.close(fd)
    return parse_header(path, file_size, header_bytes)


def parse_header(path: Path, file_size: int, header_bytes: bytes) -> ShardHeader:
    """Validate header JSON read elsewhere (from disk or a remote byte range) for a shard of `file_size` bytes."""
    shard = ShardHeader(path=path, file_size=file_size, header_bytes=header_bytes, metadata={})
    entries = _parse_json(header_bytes, path)
    shard.metadata = _parse_metadata(entries.pop(_METADATA_KEY, None), path)
    _parse_tensors(entries, shard)
    return shard


def _parse_json(header_bytes: bytes, path: Path) -> dict:
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HeaderError(f"header is not valid UTF-8 (byte {error.start})", path=path, fix="the shard is corrupt; re-export it") from error
    if not text.startswith("{"):
        raise HeaderError("header does not start with '{'", path=path, fix="the file is not a safetensors shard")
    try:
        entries = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except HeaderError as error:
        error.path = str(path)
        raise HeaderError(error.message, path=path, tensor=error.tensor, fix=error.fix) from None
    except (ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError and integers longer than Python's 4300-digit conversion limit.
        raise HeaderError(f"header is not valid JSON ({error})", path=path, fix="the shard is corrupt; re-export it") from error
    if not isinstance(entries, dict):
        raise HeaderError("header JSON is not an object", path=path, fix="the file is not a safetensors shard")
    return entries


def _parse_metadata(metadata: object, path: Path) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise HeaderError(
            "__metadata__ is not a map of strings to strings",
            path=path,
            value=metadata,
            fix="re-export the shard; safetensors allows only string metadata",
        )
    return metadata


def _parse_tensors(entries: dict, shard: ShardHeader) -> None:
    path = shard.path
    data_size = shard.file_size - shard.data_start
    spans: list[tuple[int, int, str]] = []

    for name, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(
                "entry must be an object with exactly dtype, shape and data_offsets",
                path=path,
                tensor=name,
                value=entry,
                fix="the shard is corrupt; re-export it",
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise HeaderError(
                f"unknown dtype {dtype!r}",
                path=path,
                tensor=name,
                value=dtype,
                fix="known dtypes: " + ", ".join(DTYPE_SIZES),
            )
        if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
            raise HeaderError(
                f"shape {shape!r} is not a list of non-negative integers",
                path=path,
                tensor=name,
                value=shape,
                fix="the shard is corrupt; re-export it",
            )
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if nbytes > MAX_TENSOR_BYTES:
            raise HeaderError(f"shape {shape} overflows a 64-bit byte count", path=path, tensor=name, value=shape, fix="the shard is corrupt; re-export it")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(offset) is int for offset in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise HeaderError(
                f"data_offsets {offsets!r} must be two integers [begin, end] with 0 <= begin <= end",
                path=path,
                tensor=name,
                value=offsets,
                fix="the shard is corrupt; re-export it",
            )
        begin, end = offsets
        if end > data_size:
            raise HeaderError(
                f"data_offsets {offsets} end past the {data_size}-byte data area",
                path=path,
                tensor=name,
                value=offsets,
                fix="the shard is truncated; download or copy it again",
            )
        if end - begin != nbytes:
            raise HeaderError(
                f"byte span {end - begin} differs from shape {shape} x {DTYPE_SIZES[dtype]} bytes of {dtype} = {nbytes}",
                path=path,
                tensor=name,
                value=offsets,
                fix="the shard is corrupt; re-export it",
            )
        spans.append((begin, end, name))
        shard.tensors[name] = TensorInfo(
            name=name, dtype=dtype, shape=tuple(shape), shard=path, offset=shard.data_start + begin, nbytes=nbytes
        )

    _check_coverage(spans, data_size, path)


def _check_coverage(spans: list[tuple[int, int, str]], data_size: int, path: Path) -> None:
    """Require the tensors to tile the data area exactly, as the format demands."""
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            raise HeaderError(f"bytes [{begin}, {end}) overlap the previous tensor", path=path, tensor=name, fix="the shard is corrupt; re-export it")
        if begin > position:
            raise HeaderError(
                f"gap of {begin - position} bytes before this tensor; the format forbids unused bytes",
                path=path,
                tensor=name,
                fix="the shard is corrupt; re-export it",
            )
        position = end
    if position != data_size:
        raise HeaderError(
            f"{data_size - position} bytes after the last tensor are not described by the header",
            path=path,
            fix="the shard is corrupt or has trailing data; re-export it",
        )
