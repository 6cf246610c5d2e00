"""`surgeon verify`: a finished output passes, and each kind of damage is caught by the quick or the deep check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from surgeon.api import apply_recipe
from surgeon.errors import VerifyError
from surgeon.verify import verify_output
from surgeon.writer import WriteOptions
from tests.models import build_tiny

REPO = Path(__file__).parent.parent
RECIPE = REPO / "recipes" / "tli_k4.yaml"
SHARD_SIZE = 100_000


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("verify") / "llama")


@pytest.fixture(scope="module")
def finished_output(model: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("verified") / "out"
    apply_recipe(RECIPE, model, output, max_shard_size=SHARD_SIZE, options=WriteOptions(progress=False))
    return output


def shard(folder: Path, number: int) -> Path:
    return sorted(folder.glob("*.safetensors"))[number]


def flip_last_byte(folder: Path) -> None:
    path = shard(folder, 3)
    fd = os.open(path, os.O_RDWR)
    try:
        last = os.pread(fd, 1, path.stat().st_size - 1)
        os.pwrite(fd, bytes([last[0] ^ 0xFF]), path.stat().st_size - 1)
    finally:
        os.close(fd)


def truncate_shard(folder: Path) -> None:
    path = shard(folder, 2)
    os.truncate(path, path.stat().st_size - 4)


def edit_json(name: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))

    return mutate


def replace_with_link(path: Path) -> None:
    """Move a file aside and leave a symbolic link to it in its place."""
    moved = path.with_name(path.name + ".moved")
    path.rename(moved)
    path.symlink_to(moved)


def drop_manifest_shard(manifest: dict) -> None:
    manifest["output"]["shards"].pop()


def remove_manifest(folder: Path) -> None:
    (folder / "surgeon.json").unlink()


# (case id, damage, message fragment, caught by the quick check too)
DAMAGE = [
    ("data_byte_flipped", flip_last_byte, "tensor data differs from the tensor recomputed", False),
    ("shard_truncated", truncate_shard, "output is invalid", True),
    ("shard_missing", lambda folder: shard(folder, 1).unlink(), "listed in the index is missing", True),
    ("manifest_missing", remove_manifest, "surgeon.json not found", True),
    ("manifest_shard_size_wrong", edit_json("surgeon.json", lambda manifest: manifest["output"]["shards"][0].__setitem__("size", 1)), "the manifest records 1", True),
    ("manifest_header_hash_wrong", edit_json("surgeon.json", lambda manifest: manifest["output"]["shards"][0].__setitem__("header_sha256", "0" * 64)), "header hash differs", True),
    ("manifest_lists_fewer_shards", edit_json("surgeon.json", drop_manifest_shard), "shards differ from the manifest", True),
    ("config_num_layers_wrong", edit_json("config.json", lambda config: config.__setitem__("num_hidden_layers", 6)), "num_hidden_layers = 6, but the tensors have 7 layers", True),
    ("config_layer_types_short", edit_json("config.json", lambda config: config.__setitem__("layer_types", ["full_attention"])), "layer_types has 1 entries for 7 layers", True),
    ("config_value_edited", edit_json("config.json", lambda config: config.__setitem__("rope_theta", 1.0)), "config.json differs from the file surgeon wrote", True),
    ("model_card_edited", lambda folder: (folder / "README.md").write_text("edited\n"), "README.md differs from the file surgeon wrote", True),
    ("side_file_missing", lambda folder: (folder / "generation_config.json").unlink(), "generation_config.json is missing", True),
    ("manifest_file_outside_folder", edit_json("surgeon.json", lambda manifest: manifest["output"]["files"].__setitem__("../x", "0" * 64)), "output.files has an invalid entry '../x'", True),
    ("manifest_files_not_mapping", edit_json("surgeon.json", lambda manifest: manifest["output"].__setitem__("files", [])), "output.files is not a mapping", True),
    ("side_file_replaced_by_link", lambda folder: replace_with_link(folder / "generation_config.json"), "generation_config.json is a symbolic link", True),
    ("manifest_recipe_null", edit_json("surgeon.json", lambda manifest: manifest.__setitem__("recipe", None)), "field recipe is None, expected a JSON object", True),
    ("manifest_input_path_missing", edit_json("surgeon.json", lambda manifest: manifest["inputs"]["input"].pop("path")), "field inputs.input.path is None", True),
    ("manifest_shard_size_text", edit_json("surgeon.json", lambda manifest: manifest["output"]["shards"][0].__setitem__("size", "1")), "field output.shards[0].size is '1'", True),
    ("journal_present", lambda folder: (folder / ".surgeon-journal.json").write_text("{}"), "partial folder of an unfinished run", True),
    ("manifest_deeply_nested", lambda folder: (folder / "surgeon.json").write_text('{"x": ' + "[" * 200_000 + "]" * 200_000 + "}"), "nests JSON too deeply", True),
    ("manifest_linked", lambda folder: replace_with_link(folder / "surgeon.json"), "surgeon.json is a symbolic link", True),
    ("config_linked", lambda folder: replace_with_link(folder / "config.json"), "config.json is a symbolic link", True),
    ("index_total_size_wrong", edit_json("model.safetensors.index.json", lambda index: index["metadata"].__setitem__("total_size", 5)), "metadata.total_size is 5", True),
]


def test_verify_finished_output_passes(finished_output: Path):
    manifest = json.loads((finished_output / "surgeon.json").read_text())

    report = verify_output(finished_output, deep=True)

    assert report.shards == len(list(finished_output.glob("*.safetensors")))
    assert report.compared_bytes == manifest["output"]["total_size"]


@pytest.mark.parametrize("case_id, damage, fragment, quick_catches", DAMAGE, ids=[case[0] for case in DAMAGE])
def test_verify_damaged_output(case_id, damage, fragment, quick_catches, finished_output: Path, tmp_path: Path):
    folder = tmp_path / "out"
    shutil.copytree(finished_output, folder)
    damage(folder)

    with pytest.raises(VerifyError) as deep:
        verify_output(folder, deep=True)

    assert fragment in str(deep.value)
    assert deep.value.fix
    if quick_catches:
        with pytest.raises(VerifyError):
            verify_output(folder)
    else:
        assert verify_output(folder).compared_bytes == 0


def test_verify_deep_changed_input_rejected(model: Path, tmp_path: Path):
    source = tmp_path / "input"
    shutil.copytree(model, source)
    output = tmp_path / "out"
    apply_recipe(RECIPE, source, output, max_shard_size=SHARD_SIZE, options=WriteOptions(progress=False))
    edit_json("config.json", lambda config: config.__setitem__("use_cache", False))(source)

    with pytest.raises(VerifyError) as raised:
        verify_output(output, deep=True)

    assert "changed since the output was written" in raised.value.message


def test_verify_cli_damaged_output_one_line(finished_output: Path, tmp_path: Path):
    folder = tmp_path / "out"
    shutil.copytree(finished_output, folder)
    flip_last_byte(folder)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}

    result = subprocess.run([sys.executable, "-m", "surgeon", "verify", str(folder), "--deep"], env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "tensor data differs" in result.stderr


def test_verify_rejects_trained_folder_with_reason(tmp_path: Path):
    folder = tmp_path / "final"
    folder.mkdir()
    manifest = {"output": {"shards": []}, "layers": [], "trained": {"from": "/data/grown", "note": "weights rewritten by surgeon train"}}
    (folder / "surgeon.json").write_text(json.dumps(manifest))
    with pytest.raises(VerifyError, match="written by `surgeon train`"):
        verify_output(folder)
