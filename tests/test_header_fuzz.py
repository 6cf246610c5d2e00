"""Property tests: mutated shard headers and indexes are accepted whole or rejected with surgeon's own errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgeon.checkpoint import open_checkpoint, read_header
from surgeon.errors import SurgeonError
from tests.safetensors_files import INDEX_NAME, pack, shard_bytes

# Three tensors of different dtypes and ranks, including an empty one.
VALID_TENSORS = {
    "embed.weight": ({"dtype": "F32", "shape": [4, 2]}, bytes(range(32))),
    "norm.weight": ({"dtype": "BF16", "shape": [3]}, b"\x80\x3f" * 3),
    "empty": ({"dtype": "I64", "shape": [0, 5]}, b""),
}
VALID_SHARD = pack(VALID_TENSORS)
VALID_HEADER = json.loads(VALID_SHARD[8 : 8 + int.from_bytes(VALID_SHARD[:8], "little")])
FIELDS = ("dtype", "shape", "data_offsets")

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["F32", "BF16", "F8_E4M3", "U64", "f32", ""]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


@st.composite
def byte_flips(draw) -> bytes:
    """Overwrite a few bytes anywhere in the file, the length prefix and header included."""
    data = bytearray(VALID_SHARD)
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        position = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data[position] = draw(st.integers(min_value=0, max_value=255))
    return bytes(data)


@st.composite
def field_mutations(draw) -> bytes:
    """Set one field of one entry (or of `__metadata__`) to an arbitrary JSON value, keeping the data area."""
    header = json.loads(json.dumps(VALID_HEADER))
    name = draw(st.sampled_from(sorted(header)))
    if name == "__metadata__":
        header[name] = draw(json_values | st.dictionaries(st.text(max_size=4), json_values, max_size=3))
    elif draw(st.booleans()):
        header[name][draw(st.sampled_from(FIELDS))] = draw(json_values)
    else:
        header[name][draw(st.text(max_size=6))] = draw(json_values)
    if draw(st.booleans()):
        header[draw(st.text(max_size=6))] = draw(json_values)
    data = VALID_SHARD[8 + int.from_bytes(VALID_SHARD[:8], "little") :]
    return shard_bytes(header, data)


@st.composite
def truncations(draw) -> bytes:
    return VALID_SHARD[: draw(st.integers(min_value=0, max_value=len(VALID_SHARD)))]


@st.composite
def length_prefixes(draw) -> bytes:
    length = draw(st.integers(min_value=0, max_value=2**64 - 1) | st.integers(min_value=0, max_value=len(VALID_SHARD)))
    return length.to_bytes(8, "little") + VALID_SHARD[8:]


mutated_shards = st.one_of(byte_flips(), field_mutations(), truncations(), length_prefixes())


@pytest.fixture(scope="module")
def shard_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "model.safetensors"


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=mutated_shards)
def test_read_header_mutated_shard(shard_path: Path, content: bytes):
    shard_path.write_bytes(content)

    try:
        shard = read_header(shard_path)
    except SurgeonError:
        return

    data_size = len(content) - shard.data_start
    covered = sum(info.nbytes for info in shard.tensors.values())
    assert covered == data_size
    for info in shard.tensors.values():
        assert info.offset + info.nbytes <= len(content)


def test_read_header_valid_shard(shard_path: Path):
    shard_path.write_bytes(VALID_SHARD)

    shard = read_header(shard_path)

    assert list(shard.tensors) == list(VALID_TENSORS)


index_values = st.recursive(
    st.none() | st.integers(min_value=-5, max_value=2**66) | st.text(max_size=12) | st.sampled_from(["model.safetensors", "../x", "/abs", "a\x00b"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated_indexes(draw) -> bytes:
    """Return an index for VALID_SHARD with one key of its weight map, metadata or top level replaced."""
    index = {"metadata": {"total_size": 38}, "weight_map": {name: "model.safetensors" for name in VALID_TENSORS}}
    where = draw(st.sampled_from(["weight_map", "metadata", "top"]))
    key = draw(st.sampled_from(sorted(VALID_TENSORS) + ["total_size", "extra"]) | st.text(max_size=8))
    target = index if where == "top" else index[where]
    target[key] = draw(index_values)
    return json.dumps(index).encode()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=mutated_indexes())
def test_open_checkpoint_mutated_index(tmp_path_factory, index: bytes):
    folder = tmp_path_factory.getbasetemp() / "fuzz-index"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(VALID_SHARD)
    (folder / INDEX_NAME).write_bytes(index)

    try:
        checkpoint = open_checkpoint(folder)
    except SurgeonError:
        return

    assert set(checkpoint.tensors) == set(VALID_TENSORS)
