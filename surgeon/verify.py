"""Recheck a finished output folder against the `surgeon.json` manifest written with it.

The quick check reads only headers and small files: every shard's size and
header hash against the manifest, the index against the shards, config.json's
layer fields against the tensors, and the SHA-256 of every other file
(config, index, model card, tokenizer files) against the manifest. The deep
check also compares every tensor's bytes. It recompiles the recorded recipe against the recorded inputs, whose fingerprints
must still match, and regenerates each tensor as the writer did. That keeps
hashing off the write path, at the price of needing the inputs at verify time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from surgeon.architectures import detect_architecture, split_layers
from surgeon.checkpoint import Checkpoint, open_checkpoint
from surgeon.checkpoint.reader import CONFIG_NAME, INDEX_NAME
from surgeon.errors import SurgeonError, VerifyError
from surgeon.plan import compile_plan
from surgeon.recipe import parse_recipe
from surgeon.writer import MANIFEST_NAME
from surgeon.writer.output import JOURNAL_NAME, PARTIAL_SUFFIX, file_sha256
from surgeon.writer.tensor_data import expected_chunks

logger = logging.getLogger(__name__)

# One shard holding everything, so the recompiled plan names every tensor whatever the original shard size.
_SINGLE_SHARD_SIZE = 2**62
_REBUILD_FIX = "rebuild the output with `surgeon apply`"


@dataclass
class VerifyReport:
    """Counts of the shards, tensors and tensor bytes that `verify_output` checked."""

    shards: int
    tensors: int
    compared_bytes: int


def verify_output(folder: str | Path, deep: bool = False, editable: frozenset[str] = frozenset()) -> VerifyReport:
    """Check a finished output against its manifest; with `deep`, compare every tensor's bytes too.

    Every non-shard file the manifest lists (config, index, model card,
    tokenizer files) must have its recorded SHA-256, except the `editable`
    ones, which need only exist.
    """
    folder = Path(folder)
    _check_before_reading(folder)
    manifest = read_manifest(folder)
    output = _open_output(folder)
    try:
        _check_shards(output, manifest)
        _check_layers(output, manifest)
        _check_files(folder, manifest, editable)
        compared = _compare_tensor_bytes(output, manifest) if deep else 0
    finally:
        output.close()
    return VerifyReport(shards=len(output.shards), tensors=len(output.tensors), compared_bytes=compared)


def _check_before_reading(folder: Path) -> None:
    """Reject the writer's partial folder, and links among the files read first, before reading anything.

    A partial folder's files can look complete before the run has finished, and
    a link could make verify read a file outside the output folder.
    """
    if folder.name.endswith(PARTIAL_SUFFIX) or (folder / JOURNAL_NAME).exists():
        raise VerifyError(
            f"this is the partial folder of an unfinished run (it contains {JOURNAL_NAME} or its name ends in {PARTIAL_SUFFIX})",
            path=folder,
            fix="finish the run with `surgeon apply ... --resume`, then check the output folder it names",
        )
    for name in (MANIFEST_NAME, CONFIG_NAME, INDEX_NAME):
        _reject_link(folder / name)


def _reject_link(path: Path, field: str | None = None) -> None:
    if path.is_symlink():
        raise VerifyError(f"{path.name} is a symbolic link, where surgeon wrote a regular file", path=path, field=field, fix=_REBUILD_FIX)


def is_trained_folder(folder: Path) -> bool:
    """Return whether `surgeon train` wrote the folder, which marks the manifest it copies with `trained`."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("trained"), dict)


def read_manifest(folder: Path) -> dict:
    """Return the parsed `surgeon.json` of an output folder."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise VerifyError(f"{MANIFEST_NAME} not found", path=folder, fix="pass a folder written by `surgeon apply`")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError as error:
        raise VerifyError(f"{MANIFEST_NAME} is not valid JSON ({error})", path=path, fix=_REBUILD_FIX) from error
    except RecursionError as error:
        raise VerifyError(f"{MANIFEST_NAME} nests JSON too deeply to parse", path=path, fix=_REBUILD_FIX) from error
    if not isinstance(manifest, dict):
        raise VerifyError(f"{MANIFEST_NAME} is not a JSON object", path=path, fix=_REBUILD_FIX)
    if isinstance(manifest.get("trained"), dict):
        raise VerifyError(
            "this folder was written by `surgeon train`, so its shards are no longer the ones `surgeon apply` wrote",
            path=path,
            field="trained",
            fix=f"verify the surgeon output it was trained from ({manifest['trained'].get('from')})",
        )
    _check_manifest_fields(manifest, path)
    return manifest


# The manifest fields verify reads, with their JSON types. `{}` stands for every key of a mapping and `[]` for every list item.
_MANIFEST_FIELDS = [
    ("output", dict),
    ("output.architecture", str),
    ("output.num_layers", int),
    ("output.total_size", int),
    ("output.shards", list),
    ("output.shards.[]", dict),
    ("output.shards.[].file", str),
    ("output.shards.[].size", int),
    ("output.shards.[].header_sha256", str),
    ("recipe", dict),
    ("recipe.text", str),
    ("base_model", str),
    ("inputs", dict),
    ("inputs.{}", dict),
    ("inputs.{}.path", str),
    ("inputs.{}.fingerprint", str),
]


def _check_manifest_fields(manifest: dict, path: Path) -> None:
    """Require every field verify reads to be present with its JSON type, so damage gives a VerifyError, not a traceback."""
    for field, expected in _MANIFEST_FIELDS:
        for name, value in _resolve_field(manifest, field):
            # JSON true and false load as bool, which Python counts as int.
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise VerifyError(
                    f"{MANIFEST_NAME} field {name} is {value!r}, expected a JSON {_JSON_TYPE_NAMES[expected]}",
                    path=path,
                    field=name,
                    fix=_REBUILD_FIX,
                )


_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "integer"}


def _resolve_field(manifest: dict, field: str) -> list[tuple[str, object]]:
    """Return (name, value) for every value a field pattern names, None where a key is missing.

    The table lists parents before children, so every parent here already has its checked type.
    """
    values: list[tuple[str, object]] = [("", manifest)]
    for key in field.split("."):
        if key == "[]":
            values = [(f"{name}[{index}]", item) for name, items in values for index, item in enumerate(items)]
        elif key == "{}":
            values = [(f"{name}.{child}", item) for name, items in values for child, item in items.items()]
        else:
            values = [(f"{name}.{key}".lstrip("."), item.get(key)) for name, item in values]
    return values


def _open_output(folder: Path) -> Checkpoint:
    """Open the output with the input validation: headers, index, total_size."""
    try:
        return open_checkpoint(folder)
    except SurgeonError as error:
        raise VerifyError(
            f"output is invalid: {error.message}", path=error.path or folder, tensor=error.tensor, field=error.field, fix=_REBUILD_FIX
        ) from error


def _check_shards(output: Checkpoint, manifest: dict) -> None:
    manifest_path = output.folder / MANIFEST_NAME
    recorded = {entry.get("file"): entry for entry in manifest["output"]["shards"]}
    present = {shard.path.name: shard for shard in output.shards}
    if set(recorded) != set(present):
        missing = sorted(set(recorded) - set(present), key=str)
        extra = sorted(set(present) - set(recorded))
        raise VerifyError(
            f"shards differ from the manifest: missing {missing}, not in the manifest {extra}",
            path=output.folder,
            field="output.shards",
            fix=_REBUILD_FIX,
        )

    for name, shard in present.items():
        entry = recorded[name]
        if shard.file_size != entry.get("size"):
            raise VerifyError(
                f"shard {name} is {shard.file_size} bytes, the manifest records {entry.get('size')}",
                path=shard.path,
                fix=_REBUILD_FIX,
            )
        header = len(shard.header_bytes).to_bytes(8, "little") + shard.header_bytes
        if hashlib.sha256(header).hexdigest() != entry.get("header_sha256"):
            raise VerifyError(f"shard {name} header hash differs from the manifest", path=shard.path, fix=_REBUILD_FIX)

    total = sum(info.nbytes for info in output.tensors.values())
    if total != manifest["output"].get("total_size"):
        raise VerifyError(
            f"tensors hold {total} bytes, the manifest records {manifest['output'].get('total_size')}",
            path=manifest_path,
            field="output.total_size",
            fix=_REBUILD_FIX,
        )


def _check_layers(output: Checkpoint, manifest: dict) -> None:
    """Check config.json's layer count and per-layer fields against the tensors and the manifest."""
    config_path = str(output.folder / CONFIG_NAME)
    layer_prefix = None
    if str(manifest["output"].get("architecture", "")).startswith("custom:"):
        override = parse_recipe(manifest["recipe"]["text"], str(output.folder / MANIFEST_NAME)).recipe.architecture
        layer_prefix = override.layer_prefix if override else None
    arch = detect_architecture(output.config, config_path, layer_prefix)
    try:
        table = split_layers(arch, list(output.tensors), output.config, str(output.folder))
    except SurgeonError as error:
        raise VerifyError(f"output is invalid: {error.message}", path=error.path, field=error.field, tensor=error.tensor, fix=_REBUILD_FIX) from error
    if len(table.layers) != manifest["output"].get("num_layers"):
        raise VerifyError(
            f"the tensors have {len(table.layers)} layers, the manifest records {manifest['output'].get('num_layers')}",
            path=output.folder / MANIFEST_NAME,
            field="output.num_layers",
            fix=_REBUILD_FIX,
        )


def _check_files(folder: Path, manifest: dict, editable: frozenset[str]) -> None:
    """Compare every non-shard file the manifest lists with its recorded SHA-256."""
    if "files" not in manifest["output"]:
        logger.info("%s lists no file hashes (written before surgeon recorded them); skipping that check", MANIFEST_NAME)
        return
    recorded = manifest["output"]["files"]
    if not isinstance(recorded, dict) or CONFIG_NAME not in recorded:
        raise VerifyError(
            f"output.files is not a mapping of file name to SHA-256 that includes {CONFIG_NAME}",
            path=folder / MANIFEST_NAME,
            field="output.files",
            fix=_REBUILD_FIX,
        )

    for name, digest in sorted(recorded.items()):
        # Only plain names of top-level files, so a manifest can never make verify read outside the folder.
        if not name or Path(name).name != name or name in (".", "..") or not isinstance(digest, str):
            raise VerifyError(
                f"output.files has an invalid entry {name!r}: {digest!r}",
                path=folder / MANIFEST_NAME,
                field="output.files",
                fix=_REBUILD_FIX,
            )
        path = folder / name
        _reject_link(path, field="output.files")
        if not path.is_file():
            raise VerifyError(f"{name} is missing or not a regular file, and {MANIFEST_NAME} lists it", path=path, field="output.files", fix=_REBUILD_FIX)
        if name in editable:
            continue
        actual = file_sha256(path)
        if actual != digest:
            raise VerifyError(
                f"{name} differs from the file surgeon wrote (SHA-256 {actual[:12]}..., recorded {str(digest)[:12]}...)",
                path=path,
                field="output.files",
                fix=f"restore {name} (edits after the run show here too), or {_REBUILD_FIX}",
            )


def _open_recorded_inputs(manifest: dict, manifest_path: Path) -> dict[str, Checkpoint]:
    """Open every input the manifest names and require its fingerprint to be unchanged."""
    inputs = {}
    for key, entry in manifest.get("inputs", {}).items():
        try:
            checkpoint = open_checkpoint(entry["path"])
        except SurgeonError as error:
            raise VerifyError(
                f"input {key!r} cannot be opened for the deep check: {error.message}",
                path=entry["path"],
                fix="restore the input at that path, or verify without --deep",
            ) from error
        if checkpoint.fingerprint() != entry.get("fingerprint"):
            raise VerifyError(
                f"input {key!r} changed since the output was written, so its bytes cannot be compared",
                path=entry["path"],
                field=f"inputs.{key}.fingerprint",
                fix="restore the original input, or verify without --deep",
            )
        inputs[key] = checkpoint
    if not inputs:
        raise VerifyError("manifest names no inputs", path=manifest_path, field="inputs", fix=_REBUILD_FIX)
    return inputs


def _compare_tensor_bytes(output: Checkpoint, manifest: dict) -> int:
    """Regenerate every tensor from the recorded recipe and inputs and compare it with the output; return bytes compared."""
    manifest_path = output.folder / MANIFEST_NAME
    inputs = _open_recorded_inputs(manifest, manifest_path)
    try:
        recipe = parse_recipe(manifest["recipe"]["text"], str(manifest_path))
        plan = compile_plan(recipe, inputs, base_model=manifest["base_model"], max_shard_size=_SINGLE_SHARD_SIZE)
        expected = {tensor.name: tensor.expr for tensor in plan.tensors}
        if set(expected) != set(output.tensors):
            missing = sorted(set(expected) - set(output.tensors))
            extra = sorted(set(output.tensors) - set(expected))
            raise VerifyError(f"tensors differ from the recipe: missing {missing[:5]}, unexpected {extra[:5]}", path=output.folder, fix=_REBUILD_FIX)

        compared = 0
        for name, info in output.tensors.items():
            compared += _compare_tensor(output, info, expected[name])
        return compared
    finally:
        for checkpoint in inputs.values():
            checkpoint.close()


def _compare_tensor(output: Checkpoint, info, expr) -> int:
    if info.dtype != expr.dtype or info.shape != tuple(expr.shape):
        raise VerifyError(
            f"tensor is {info.dtype} {list(info.shape)}, the recipe makes {expr.dtype} {list(expr.shape)}",
            path=info.shard,
            tensor=info.name,
            fix=_REBUILD_FIX,
        )
    position = 0
    for chunk in expected_chunks(expr):
        written = output.read(info, position, len(chunk))
        if written != chunk:
            first = next(index for index, (a, b) in enumerate(zip(written, chunk)) if a != b)
            raise VerifyError(
                f"tensor data differs from the tensor recomputed from the inputs at byte {position + first}; "
                "either the output or an input's tensor data changed since the run (the input fingerprint covers "
                "headers and config.json, not tensor values)",
                path=info.shard,
                tensor=info.name,
                fix="if the inputs are the ones the output was built from, " + _REBUILD_FIX,
            )
        position += len(chunk)
    logger.debug("tensor %s matches (%d bytes)", info.name, position)
    return position
