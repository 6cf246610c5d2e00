"""Write safetensors shards byte by byte, valid or not, and snapshot folders.

The malformed-input and fuzz tests need files that no well-behaved library
would write, so shards are assembled here from a header object (or raw header
bytes) and a data area.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"
FIRST_SHARD = "model-00001-of-00002.safetensors"
SECOND_SHARD = "model-00002-of-00002.safetensors"


def shard_bytes(header: dict | bytes, data: bytes = b"", declared_length: int | None = None) -> bytes:
    """Return a shard file: the 8-byte little-endian header length, the header, then `data`."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(body) if declared_length is None else declared_length
    return length.to_bytes(8, "little") + body + data


def read_shard(path: Path) -> tuple[dict, bytes]:
    """Return a shard's header object and its data area."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def tensors_of(header: dict, data: bytes) -> dict[str, tuple[dict, bytes]]:
    """Split a shard into {name: (entry without offsets, bytes)} in file order."""
    result = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        result[name] = ({"dtype": entry["dtype"], "shape": entry["shape"]}, data[begin:end])
    return result


def pack(tensors: dict[str, tuple[dict, bytes]], metadata: dict | None = None) -> bytes:
    """Return a valid shard holding `tensors` back to back."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    data = b""
    for name, (entry, payload) in tensors.items():
        header[name] = {**entry, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    return shard_bytes(header, data)


def make_sharded_copy(source: Path, target: Path) -> Path:
    """Copy a single-shard checkpoint into `target`, split into two shards with an index."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name != "model.safetensors":
            shutil.copyfile(path, target / path.name)

    header, data = read_shard(source / "model.safetensors")
    tensors = tensors_of(header, data)
    names = list(tensors)
    half = len(names) // 2
    groups = {FIRST_SHARD: names[:half], SECOND_SHARD: names[half:]}
    weight_map = {}
    for shard_name, group in groups.items():
        (target / shard_name).write_bytes(pack({name: tensors[name] for name in group}))
        weight_map.update({name: shard_name for name in group})

    total = sum(len(payload) for _, payload in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return target


def snapshot(folder: Path) -> dict[str, tuple]:
    """Return {relative path: (kind, sha256 or link target, size, mtime_ns)} for everything under `folder`."""
    state = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root) / name
            info = path.lstat()
            relative = str(path.relative_to(folder))
            if path.is_symlink():
                state[relative] = ("link", os.readlink(path), info.st_size, info.st_mtime_ns)
            elif path.is_file():
                state[relative] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), info.st_size, info.st_mtime_ns)
            else:
                state[relative] = ("folder", None, None, info.st_mtime_ns)
    return state
