"""Malformed checkpoints and unsafe output paths: each raises its own error and leaves the input untouched."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from surgeon.api import apply_recipe
from surgeon.errors import (
    ConfigError,
    HeaderError,
    OutputError,
    PickleWeightsError,
    ShardIndexError,
    SurgeonError,
)
from surgeon.writer import WriteOptions, partial_folder
from tests.models import build_tiny
from tests.safetensors_files import (
    FIRST_SHARD,
    INDEX_NAME,
    SECOND_SHARD,
    make_sharded_copy,
    pack,
    read_shard,
    shard_bytes,
    snapshot,
    tensors_of,
)

RECIPE = Path(__file__).parent.parent / "recipes" / "tli_k4.yaml"
# A valid F32 [2, 2] tensor entry and its 16 data bytes, for hand-made headers.
F32_2x2 = {"dtype": "F32", "shape": [2, 2]}
DATA_16 = bytes(range(16))


def write_second_shard(folder: Path, content: bytes) -> None:
    (folder / SECOND_SHARD).write_bytes(content)


def header_case(header: dict | bytes, data: bytes = DATA_16, declared_length: int | None = None) -> Callable:
    """Return a mutation that replaces the second shard with the given header and data."""
    return lambda folder, scratch: write_second_shard(folder, shard_bytes(header, data, declared_length))


def raw_case(content: bytes) -> Callable:
    return lambda folder, scratch: write_second_shard(folder, content)


def edit_json(name: str, edit: Callable[[dict], None]) -> Callable:
    """Return a mutation that loads a JSON file of the folder, edits it and writes it back."""

    def mutate(folder: Path, scratch: Path) -> None:
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))

    return mutate


def set_shard_name(old: str, new: str) -> Callable:
    def edit(index: dict) -> None:
        index["weight_map"] = {tensor: (new if shard == old else shard) for tensor, shard in index["weight_map"].items()}

    return edit_json(INDEX_NAME, edit)


def first_tensor(folder: Path, shard: str) -> str:
    header, _ = read_shard(folder / shard)
    return next(name for name in header if name != "__metadata__")


def drop_from_index(folder: Path, scratch: Path) -> None:
    name = first_tensor(folder, SECOND_SHARD)
    edit_json(INDEX_NAME, lambda index: index["weight_map"].pop(name))(folder, scratch)


def add_phantom_to_index(folder: Path, scratch: Path) -> None:
    edit_json(INDEX_NAME, lambda index: index["weight_map"].__setitem__("model.phantom.weight", SECOND_SHARD))(folder, scratch)


def duplicate_across_shards(folder: Path, scratch: Path) -> None:
    """Copy the first shard's first tensor into the second shard too."""
    first = tensors_of(*read_shard(folder / FIRST_SHARD))
    second = tensors_of(*read_shard(folder / SECOND_SHARD))
    name = next(iter(first))
    write_second_shard(folder, pack({**second, name: first[name]}))


def link_shard_outside(folder: Path, scratch: Path) -> None:
    outside = scratch / "elsewhere.safetensors"
    shutil.move(folder / SECOND_SHARD, outside)
    os.symlink(outside, folder / SECOND_SHARD)


def link_single_shard_outside(folder: Path, scratch: Path) -> None:
    outside = scratch / "elsewhere.safetensors"
    shutil.copyfile(folder / SECOND_SHARD, outside)
    for name in (FIRST_SHARD, SECOND_SHARD, INDEX_NAME):
        (folder / name).unlink()
    os.symlink(outside, folder / "model.safetensors")


def remove(name: str) -> Callable:
    return lambda folder, scratch: (folder / name).unlink()


class RunsCodeWhenUnpickled:
    """A pickle payload that creates a folder when loaded, proving whether anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def only_pickled_weights(file_name: str) -> Callable:
    def mutate(folder: Path, scratch: Path) -> None:
        for name in (FIRST_SHARD, SECOND_SHARD, INDEX_NAME):
            (folder / name).unlink()
        (folder / file_name).write_bytes(pickle.dumps(RunsCodeWhenUnpickled(scratch / "unpickled")))

    return mutate


def set_layer_types(count: int) -> Callable:
    return edit_json("config.json", lambda config: config.__setitem__("layer_types", ["full_attention"] * count))


def output_is_input(folder: Path, scratch: Path) -> tuple[Path, Path]:
    return folder, folder


def output_inside_input(folder: Path, scratch: Path) -> tuple[Path, Path]:
    return folder, folder / "out"


def output_contains_input(folder: Path, scratch: Path) -> tuple[Path, Path]:
    return folder, folder.parent


def output_links_to_input(folder: Path, scratch: Path) -> tuple[Path, Path]:
    link = scratch / "link-to-input"
    os.symlink(folder, link)
    return folder, link


def partial_folder_is_input(folder: Path, scratch: Path) -> tuple[Path, Path]:
    """Move the input to where the output's hidden partial folder would be."""
    output = scratch / "twin"
    shutil.move(folder, partial_folder(output))
    return partial_folder(output), output


def unchanged(folder: Path, scratch: Path) -> None:
    return None


@dataclass
class Case:
    id: str
    mutate: Callable[[Path, Path], None]
    error: type[SurgeonError]
    fragment: str
    # Returns (input folder, output folder) for cases about the output location.
    locate: Callable[[Path, Path], tuple[Path, Path]] | None = None


CASES = [
    # Shard headers.
    Case("empty_file", raw_case(b""), HeaderError, "shorter than the 8-byte header length prefix"),
    Case("shorter_than_prefix", raw_case(b"\x10\x00\x00"), HeaderError, "shorter than the 8-byte header length prefix"),
    Case("header_past_end", header_case({"a": {**F32_2x2, "data_offsets": [0, 16]}}, declared_length=10_000), HeaderError, "runs past the end"),
    Case("header_over_100mb", raw_case((100_000_001).to_bytes(8, "little") + b"{}"), HeaderError, "exceeds the 100000000-byte limit"),
    Case("header_not_utf8", header_case(b'{"\xff\xfe": 1}  '), HeaderError, "not valid UTF-8"),
    Case("header_not_json", header_case(b'{"a": {"dtype": '), HeaderError, "not valid JSON"),
    Case("header_json_array", header_case(b"[1, 2, 3]"), HeaderError, "does not start with '{'"),
    Case("header_not_object", header_case(b"{} []"), HeaderError, "not valid JSON"),
    Case("header_deeply_nested", header_case(b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"), HeaderError, "not valid JSON"),
    Case("header_huge_integer", header_case(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 16]}}'), HeaderError, "not valid JSON"),
    Case("duplicate_tensor_name", header_case(b'{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}'), HeaderError, "duplicate tensor name"),
    Case("unknown_dtype", header_case({"a": {"dtype": "F17", "shape": [2, 2], "data_offsets": [0, 16]}}), HeaderError, "unknown dtype 'F17'"),
    Case("negative_shape", header_case({"a": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}), HeaderError, "not a list of non-negative integers"),
    Case("float_shape", header_case({"a": {"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}}), HeaderError, "not a list of non-negative integers"),
    Case("overflowing_shape", header_case({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}), HeaderError, "overflows a 64-bit byte count"),
    Case("offsets_past_data", header_case({"a": {**F32_2x2, "data_offsets": [0, 32]}}), HeaderError, "end past the 16-byte data area"),
    Case("offsets_reversed", header_case({"a": {**F32_2x2, "data_offsets": [16, 0]}}), HeaderError, "0 <= begin <= end"),
    Case("offsets_overlap", header_case({"a": {**F32_2x2, "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}), HeaderError, "overlap the previous tensor"),
    Case("offsets_gap", header_case({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}), HeaderError, "gap of 8 bytes"),
    Case("trailing_data", header_case({"a": {**F32_2x2, "data_offsets": [0, 16]}}, data=DATA_16 + b"extra"), HeaderError, "bytes after the last tensor"),
    Case("span_differs_from_shape", header_case({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}), HeaderError, "byte span 16 differs"),
    Case("metadata_non_string_value", header_case({"__metadata__": {"format": 1}, "a": {**F32_2x2, "data_offsets": [0, 16]}}), HeaderError, "__metadata__ is not a map of strings"),
    Case("metadata_is_list", header_case({"__metadata__": ["pt"], "a": {**F32_2x2, "data_offsets": [0, 16]}}), HeaderError, "__metadata__ is not a map of strings"),
    Case("entry_extra_key", header_case({"a": {**F32_2x2, "data_offsets": [0, 16], "strides": [2, 1]}}), HeaderError, "exactly dtype, shape and data_offsets"),
    # The shard index.
    Case("index_missing_shard", remove(SECOND_SHARD), ShardIndexError, "listed in the index is missing"),
    Case("index_absolute_shard_name", set_shard_name(SECOND_SHARD, "/etc/passwd"), ShardIndexError, "must be a plain file name"),
    Case("index_parent_shard_name", set_shard_name(SECOND_SHARD, "../" + SECOND_SHARD), ShardIndexError, "must be a plain file name"),
    Case("index_shard_symlink_outside", link_shard_outside, ShardIndexError, "outside the input folder"),
    Case("single_shard_symlink_outside", link_single_shard_outside, ShardIndexError, "outside the input folder"),
    Case("index_tensor_not_in_shard", add_phantom_to_index, ShardIndexError, "that shard does not contain it"),
    Case("shard_tensor_not_in_index", drop_from_index, ShardIndexError, "the index lists it nowhere"),
    Case("tensor_in_two_shards", duplicate_across_shards, ShardIndexError, "appears in both"),
    Case("index_total_size_wrong", edit_json(INDEX_NAME, lambda index: index["metadata"].__setitem__("total_size", 12345)), ShardIndexError, "metadata.total_size is 12345"),
    Case("index_not_json", lambda folder, scratch: (folder / INDEX_NAME).write_text("{not json"), ShardIndexError, "index is not valid JSON"),
    Case("index_metadata_not_object", edit_json(INDEX_NAME, lambda index: index.__setitem__("metadata", [1])), ShardIndexError, "index metadata is not a JSON object"),
    Case("index_without_weight_map", edit_json(INDEX_NAME, lambda index: index.pop("weight_map")), ShardIndexError, "no weight_map"),
    Case("shards_without_index", remove(INDEX_NAME), ShardIndexError, "neither model.safetensors nor"),
    # config.json.
    Case("config_missing", remove("config.json"), ConfigError, "config.json not found"),
    Case("config_not_json", lambda folder, scratch: (folder / "config.json").write_text("{"), ConfigError, "config.json is not valid JSON"),
    Case("config_num_layers_too_high", edit_json("config.json", lambda config: config.__setitem__("num_hidden_layers", 7)), ConfigError, "num_hidden_layers = 7, but the tensors have 6 layers"),
    Case("config_num_layers_too_low", edit_json("config.json", lambda config: config.__setitem__("num_hidden_layers", 5)), ConfigError, "num_hidden_layers = 5, but the tensors have 6 layers"),
    Case("config_layer_types_short", set_layer_types(5), ConfigError, "layer_types has 5 entries for 6 layers"),
    # Pickled weights are never loaded.
    Case("only_bin_weights", only_pickled_weights("pytorch_model.bin"), PickleWeightsError, "surgeon never unpickles"),
    Case("only_pt_weights", only_pickled_weights("model.pt"), PickleWeightsError, "surgeon never unpickles"),
    Case("only_pth_weights", only_pickled_weights("consolidated.pth"), PickleWeightsError, "surgeon never unpickles"),
    # Output locations.
    Case("output_is_input", unchanged, OutputError, "overlaps the input folder", locate=output_is_input),
    Case("output_inside_input", unchanged, OutputError, "overlaps the input folder", locate=output_inside_input),
    Case("output_contains_input", unchanged, OutputError, "overlaps the input folder", locate=output_contains_input),
    Case("output_symlink_to_input", unchanged, OutputError, "overlaps the input folder", locate=output_links_to_input),
    Case("partial_folder_is_input", unchanged, OutputError, "overlaps the input folder", locate=partial_folder_is_input),
]


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    """A tiny llama checkpoint split into two shards with an index."""
    root = tmp_path_factory.mktemp("sharded")
    return make_sharded_copy(build_tiny("llama", root / "single"), root / "llama")


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_malformed_input_rejected(case: Case, sharded_llama: Path, tmp_path: Path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    folder = tmp_path / "models" / "input"
    shutil.copytree(sharded_llama, folder)
    case.mutate(folder, scratch)
    folder, output = case.locate(folder, scratch) if case.locate else (folder, tmp_path / "out")
    before = snapshot(folder)

    with pytest.raises(case.error) as raised:
        apply_recipe(RECIPE, folder, output, options=WriteOptions(progress=False))

    assert type(raised.value) is case.error
    assert case.fragment in raised.value.message
    assert raised.value.fix
    assert snapshot(folder) == before
    assert not (scratch / "unpickled").exists()
    if case.locate is None:
        assert not output.exists()
        assert not partial_folder(output).exists()


def test_malformed_cases_cover_every_error_class():
    classes = {case.error for case in CASES}
    assert classes >= {HeaderError, ShardIndexError, ConfigError, PickleWeightsError, OutputError}


def test_pickle_error_says_how_to_convert(sharded_llama: Path, tmp_path: Path):
    folder = tmp_path / "input"
    shutil.copytree(sharded_llama, folder)
    only_pickled_weights("pytorch_model.bin")(folder, tmp_path)

    with pytest.raises(PickleWeightsError) as raised:
        apply_recipe(RECIPE, folder, tmp_path / "out", options=WriteOptions(progress=False))

    assert "save_pretrained" in raised.value.fix


def test_pickle_beside_safetensors_ignored(sharded_llama: Path, tmp_path: Path):
    folder = tmp_path / "input"
    shutil.copytree(sharded_llama, folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCodeWhenUnpickled(tmp_path / "unpickled")))

    apply_recipe(RECIPE, folder, tmp_path / "out", options=WriteOptions(progress=False))

    assert not (tmp_path / "unpickled").exists()
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()


def test_input_changed_during_write_rejected(sharded_llama: Path, tmp_path: Path):
    from surgeon.api import plan_recipe
    from surgeon.writer import write_output

    folder = tmp_path / "input"
    shutil.copytree(sharded_llama, folder)
    plan = plan_recipe(RECIPE, folder)
    header, data = read_shard(folder / SECOND_SHARD)
    header["__metadata__"] = {"format": "pt", "edited": "yes"}
    (folder / SECOND_SHARD).write_bytes(shard_bytes(header, data))

    with pytest.raises(OutputError) as raised:
        write_output(plan, tmp_path / "out", WriteOptions(progress=False))

    assert "changed while surgeon was writing" in raised.value.message
    assert not (tmp_path / "out").exists()
