"""Open a Hugging Face checkpoint folder: config, index and every shard header.

Only headers are read here. Tensor bytes are read later, by byte range, by the
writer, through `Checkpoint.read`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from surgeon.checkpoint.header import ShardHeader, TensorInfo, read_header
from surgeon.errors import CheckpointError, ConfigError, PickleWeightsError, ShardIndexError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_SHARD_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# config.json and the index are small, so a larger file is not genuine and is never read into memory.
MAX_JSON_FILE_BYTES = 100_000_000


@dataclass
class Checkpoint:
    """A validated input checkpoint: its config and where every tensor's bytes are."""

    folder: Path
    config: dict
    config_bytes: bytes
    shards: list[ShardHeader]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    # The reference the user gave when it is not the folder itself, e.g. `hf://ORG/NAME@COMMIT`.
    source: str | None = None
    # The folder that shard symlinks may resolve into, when wider than `folder`.
    allowed_root: Path | None = None
    _descriptors: dict[Path, int] = field(default_factory=dict, repr=False)

    def fingerprint(self) -> str:
        """Hash of config.json and every shard's name, size and header."""
        digest = hashlib.sha256(self.config_bytes)
        for shard in self.shards:
            digest.update(shard.path.name.encode())
            digest.update(shard.fingerprint().encode())
        return digest.hexdigest()

    def parameter_count(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    def descriptor(self, shard: Path) -> int:
        """Return a read-only file descriptor for a shard, opened once per run."""
        if shard not in self._descriptors:
            descriptor = os.open(shard, os.O_RDONLY)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._descriptors[shard] = descriptor
        return self._descriptors[shard]

    def read(self, info: TensorInfo, start: int, length: int) -> bytes:
        """Read `length` bytes starting `start` bytes into a tensor's data."""
        data = os.pread(self.descriptor(info.shard), length, info.offset + start)
        if len(data) != length:
            raise CheckpointError(
                f"short read: expected {length} bytes, got {len(data)}",
                path=info.shard,
                tensor=info.name,
                fix="the shard changed or was truncated while surgeon ran; check the input",
            )
        return data

    def close_shard(self, shard: Path) -> None:
        """Close a shard's descriptor, so deleting the file frees its disk space."""
        descriptor = self._descriptors.pop(shard, None)
        if descriptor is not None:
            os.close(descriptor)

    def close(self) -> None:
        for descriptor in self._descriptors.values():
            os.close(descriptor)
        self._descriptors.clear()


def open_checkpoint(
    folder: str | Path,
    *,
    fetched_headers: dict[str, ShardHeader] | None = None,
    allowed_root: Path | None = None,
) -> Checkpoint:
    """Validate the folder's config, index and shard headers and return the checkpoint.

    `fetched_headers` holds, by file name, headers of shards that are not on disk
    yet (a streamed Hub input downloads them later). `allowed_root` widens where
    shard symlinks may point: a Hub cache snapshot links into the repo's blobs folder.
    """
    folder = Path(folder)
    fetched_headers = fetched_headers or {}
    if not folder.is_dir():
        raise CheckpointError("input folder not found", path=folder, fix="pass a folder that contains config.json and *.safetensors")

    config_bytes, config = _read_config(folder)
    roots = _allowed_roots(folder)
    if allowed_root is not None:
        roots.append(allowed_root.resolve())
    shard_paths, weight_map, declared_total = _find_shards(folder, roots, set(fetched_headers))
    shards = [fetched_headers[path.name] if path.name in fetched_headers else read_header(path) for path in shard_paths]

    checkpoint = Checkpoint(folder=folder, config=config, config_bytes=config_bytes, shards=shards, allowed_root=allowed_root)
    _collect_tensors(checkpoint, weight_map, declared_total)
    logger.debug("opened %s: %d shards, %d tensors", folder, len(shards), len(checkpoint.tensors))
    return checkpoint


def _read_config(folder: Path) -> tuple[bytes, dict]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ConfigError("config.json not found", path=folder, fix="copy the model's config.json into the folder")
    config_bytes = _read_small_file(path, ConfigError)
    try:
        config = json.loads(config_bytes)
    except (ValueError, RecursionError) as error:
        raise ConfigError(f"config.json is not valid JSON ({error})", path=path, fix="repair or re-download config.json") from error
    if not isinstance(config, dict):
        raise ConfigError("config.json is not a JSON object", path=path, fix="repair or re-download config.json")
    return config_bytes, config


def _read_small_file(path: Path, error_type: type[CheckpointError]) -> bytes:
    """Read a JSON side file, rejecting one too large to be genuine before reading it."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_FILE_BYTES:
            raise error_type(
                f"file is {size:,} bytes, over the {MAX_JSON_FILE_BYTES:,}-byte limit for {path.name}",
                path=path,
                value=size,
                fix=f"replace {path.name} with the one that came with the model",
            )
        return path.read_bytes()
    except OSError as error:
        raise error_type(f"cannot read file: {error.strerror}", path=path, fix="check the file exists and is readable") from error


def _allowed_roots(folder: Path) -> list[Path]:
    """Return the folders a shard may resolve into: the input folder, plus the Hub cache's blobs.

    A Hugging Face Hub cache snapshot (`models--org--name/snapshots/<revision>`)
    links every file to `../../blobs/<hash>`, so that blobs folder is allowed too.
    """
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def _find_shards(folder: Path, roots: list[Path], fetched: set[str]) -> tuple[list[Path], dict[str, str] | None, int | None]:
    """Return the shard paths, the index's weight map and its declared total size."""
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        return _read_index(folder, index_path, roots, fetched)

    single = folder / SINGLE_SHARD_NAME
    if SINGLE_SHARD_NAME in fetched:
        return [single], None, None
    if single.is_file():
        _check_inside_folder(single, roots, SINGLE_SHARD_NAME, folder)
        return [single], None, None

    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        raise ShardIndexError(
            f"found {', '.join(others)} but neither {SINGLE_SHARD_NAME} nor {INDEX_NAME}",
            path=folder,
            fix=f"add the {INDEX_NAME} that came with these shards, or rename a single shard to {SINGLE_SHARD_NAME}",
        )
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise PickleWeightsError(
            f"only pickled weights found ({', '.join(pickled)}); surgeon never unpickles files because loading them can run arbitrary code",
            path=folder,
            fix="convert them to safetensors in a sandbox you trust, e.g. "
            "transformers.AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder), then pass new_folder",
        )
    raise CheckpointError("no safetensors weights found", path=folder, fix=f"the folder needs {SINGLE_SHARD_NAME} or {INDEX_NAME} with its shards")


def _read_index(folder: Path, index_path: Path, roots: list[Path], fetched: set[str]) -> tuple[list[Path], dict[str, str], int | None]:
    try:
        index = json.loads(_read_small_file(index_path, ShardIndexError))
    except (ValueError, RecursionError) as error:
        raise ShardIndexError(f"index is not valid JSON ({error})", path=index_path, fix="repair or re-download the index") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ShardIndexError("index has no weight_map of tensor names to shard file names", path=index_path, fix="repair or re-download the index")

    metadata = index.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ShardIndexError("index metadata is not a JSON object", path=index_path, field="metadata", value=metadata, fix="repair the index")
    declared_total = (metadata or {}).get("total_size")
    if declared_total is not None and (type(declared_total) is not int or declared_total < 0):
        raise ShardIndexError(f"metadata.total_size {declared_total!r} is not a non-negative integer", path=index_path, field="metadata.total_size", fix="repair the index")

    shard_paths: list[Path] = []
    for shard_name in dict.fromkeys(weight_map.values()):
        shard_paths.append(_resolve_shard(folder, roots, shard_name, index_path, shard_name in fetched))

    unlisted = sorted(p.name for p in folder.glob("*.safetensors") if p not in shard_paths)
    if unlisted:
        logger.warning("%s: ignoring %s, which the index does not list", folder, ", ".join(unlisted))
    return shard_paths, weight_map, declared_total


def _resolve_shard(folder: Path, roots: list[Path], shard_name: str, index_path: Path, fetched: bool) -> Path:
    """Resolve a shard name from the index, rejecting any that would leave the folder."""
    if os.path.isabs(shard_name) or ".." in Path(shard_name).parts or "\\" in shard_name or "\0" in shard_name:
        raise ShardIndexError(
            f"shard name {shard_name!r} must be a plain file name inside the folder",
            path=index_path,
            value=shard_name,
            fix="edit the index so every shard is a relative name without '..'",
        )
    path = folder / shard_name
    if fetched:
        return path
    if not path.is_file():
        raise ShardIndexError(f"shard {shard_name} listed in the index is missing", path=index_path, value=shard_name, fix="download the missing shard")
    _check_inside_folder(path, roots, shard_name, index_path)
    return path


def _check_inside_folder(path: Path, roots: list[Path], shard_name: str, error_path: Path) -> None:
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in roots):
        raise ShardIndexError(
            f"shard {shard_name} resolves through a symlink to {target}, outside the input folder",
            path=error_path,
            value=shard_name,
            fix="copy the shard into the folder instead of linking outside it",
        )


def _collect_tensors(checkpoint: Checkpoint, weight_map: dict[str, str] | None, declared_total: int | None) -> None:
    for shard in checkpoint.shards:
        for name, info in shard.tensors.items():
            if name in checkpoint.tensors:
                raise ShardIndexError(
                    f"tensor appears in both {checkpoint.tensors[name].shard.name} and {shard.path.name}",
                    path=checkpoint.folder,
                    tensor=name,
                    fix="remove the duplicate shard or re-export the checkpoint",
                )
            if weight_map is not None and weight_map.get(name) != shard.path.name:
                listed = weight_map.get(name)
                raise ShardIndexError(
                    f"tensor is in {shard.path.name} but the index lists it " + (f"in {listed}" if listed else "nowhere"),
                    path=checkpoint.folder / INDEX_NAME,
                    tensor=name,
                    fix="regenerate the index from the shards",
                )
            checkpoint.tensors[name] = info

    if weight_map is not None:
        for name, shard_name in weight_map.items():
            if name not in checkpoint.tensors:
                raise ShardIndexError(
                    f"index lists the tensor in {shard_name}, but that shard does not contain it",
                    path=checkpoint.folder / INDEX_NAME,
                    tensor=name,
                    fix="regenerate the index from the shards, or download the right shard",
                )

    actual_total = sum(info.nbytes for info in checkpoint.tensors.values())
    if declared_total is not None and declared_total != actual_total:
        raise ShardIndexError(
            f"metadata.total_size is {declared_total} but the shards hold {actual_total} bytes of tensors",
            path=checkpoint.folder / INDEX_NAME,
            field="metadata.total_size",
            value=declared_total,
            fix=f"set metadata.total_size to {actual_total} or regenerate the index",
        )
