"""TLI end to end: real SmolLM2 and tiny checkpoints of every supported architecture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from surgeon.api import apply_recipe
from surgeon.recipe import parse_recipe
from surgeon.writer import WriteOptions
from tests.checks import folder_digest, load_causal_lm, max_logit_difference, tensor_bytes, token_ids
from tests.models import TINY_ARCHITECTURES

REPO = Path(__file__).resolve().parents[1]
TLI_K4 = REPO / "recipes" / "tli_k4.yaml"
QUIET = WriteOptions(progress=False)


def expected_layer_sources(num_layers: int, every: int) -> list[int | None]:
    """Input layer of each output layer for TLI after every group; None marks a new layer."""
    sources: list[int | None] = []
    for index in range(num_layers):
        sources.append(index)
        if (index + 1) % every == 0:
            sources.append(None)
    return sources


@pytest.fixture(scope="module")
def smollm2_tli(smollm2_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("tli") / "out"
    apply_recipe(TLI_K4, smollm2_dir, output, options=QUIET)
    return output


def test_tli_k4_smollm2_has_37_layers(smollm2_tli):
    config = json.loads((smollm2_tli / "config.json").read_text())
    assert config["num_hidden_layers"] == 37


def test_tli_k4_smollm2_loads_without_key_mismatch(smollm2_tli):
    _, info = load_causal_lm(smollm2_tli)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


def test_tli_k4_smollm2_logits_equal_input(smollm2_dir, smollm2_tli, english_text):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer(english_text, return_tensors="pt").input_ids[:, :256]
    difference = max_logit_difference(smollm2_dir, smollm2_tli, ids)
    print(f"SmolLM2 TLI K=4: max |logit difference| = {difference:.3e} over {ids.shape[1]} tokens")
    assert difference <= 1e-5


def test_tli_k4_smollm2_original_layers_byte_identical(smollm2_dir, smollm2_tli):
    source = tensor_bytes(smollm2_dir)
    output = tensor_bytes(smollm2_tli)
    manifest = json.loads((smollm2_tli / "surgeon.json").read_text())
    mismatched = []
    compared = 0
    for layer in manifest["layers"]:
        if layer["new"]:
            continue
        prefix_out, prefix_in = f"model.layers.{layer['index']}.", f"model.layers.{layer['source_layer']}."
        for name, data in output.items():
            if name.startswith(prefix_out):
                compared += 1
                if data != source[prefix_in + name[len(prefix_out) :]]:
                    mismatched.append(name)
    assert compared == 30 * 9
    assert mismatched == []


def test_tli_k4_smollm2_layer_map_matches_groups(smollm2_tli):
    manifest = json.loads((smollm2_tli / "surgeon.json").read_text())
    sources = [None if layer["new"] else layer["source_layer"] for layer in manifest["layers"]]
    assert sources == expected_layer_sources(30, 4)


def test_tli_k4_smollm2_new_layers_zero_output_projections(smollm2_tli):
    output = tensor_bytes(smollm2_tli)
    manifest = json.loads((smollm2_tli / "surgeon.json").read_text())
    new_indices = [layer["index"] for layer in manifest["layers"] if layer["new"]]
    for index in new_indices:
        for suffix in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            assert not any(output[f"model.layers.{index}.{suffix}"]), f"layer {index} {suffix} is not zero"


def test_tli_k4_smollm2_side_files_byte_identical(smollm2_dir, smollm2_tli):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (smollm2_tli / name).read_bytes() == (smollm2_dir / name).read_bytes(), name


def test_tli_k4_smollm2_config_keeps_other_keys(smollm2_dir, smollm2_tli):
    before = json.loads((smollm2_dir / "config.json").read_text())
    after = json.loads((smollm2_tli / "config.json").read_text())
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    assert changed == {"num_hidden_layers"}


def test_tli_k4_smollm2_index_total_size(smollm2_tli):
    index = json.loads((smollm2_tli / "model.safetensors.index.json").read_text())
    tensors = tensor_bytes(smollm2_tli)
    assert index["metadata"]["total_size"] == sum(len(data) for data in tensors.values())


def test_tli_two_runs_byte_identical(smollm2_dir, smollm2_tli, tmp_path):
    apply_recipe(TLI_K4, smollm2_dir, tmp_path / "again", options=QUIET)
    assert folder_digest(tmp_path / "again") == folder_digest(smollm2_tli)


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_tli_tiny_architecture_preserves_logits(architecture, tiny_models, english_text, tmp_path):
    source = tiny_models[architecture]
    recipe = parse_recipe("version: 1\nsteps:\n  - tli:\n      every: 2\n", "tli_k2.yaml")
    apply_recipe(recipe, source, tmp_path / "out", options=QUIET)

    _, info = load_causal_lm(tmp_path / "out")
    assert not info["missing_keys"], architecture
    assert not info["unexpected_keys"], architecture
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 9
    difference = max_logit_difference(source, tmp_path / "out", token_ids(english_text, config["vocab_size"]))
    print(f"{architecture}: max |logit difference| = {difference:.3e}")
    assert difference <= 1e-5


@pytest.mark.parametrize("architecture", ["gemma2", "gemma3_text", "qwen2"])
def test_tli_layer_types_follow_source_layers(architecture, tiny_models, tmp_path):
    source = tiny_models[architecture]
    recipe = parse_recipe("version: 1\nsteps:\n  - tli:\n      every: 2\n", "tli_k2.yaml")
    apply_recipe(recipe, source, tmp_path / "out", options=QUIET)
    before = json.loads((source / "config.json").read_text())["layer_types"]
    after = json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"]
    expected = [before[index] if index is not None else before[previous] for index, previous in _with_previous(expected_layer_sources(6, 2))]
    assert after == expected


def _with_previous(sources: list[int | None]) -> list[tuple[int | None, int | None]]:
    pairs, previous = [], None
    for source in sources:
        pairs.append((source, previous))
        previous = source if source is not None else previous
    return pairs


def test_tli_gemma2_without_layer_types_writes_pattern(tiny_models, english_text, tmp_path):
    source = tmp_path / "gemma2-old-config"
    shutil.copytree(tiny_models["gemma2"], source)
    config = json.loads((source / "config.json").read_text())
    del config["layer_types"]
    (source / "config.json").write_text(json.dumps(config, indent=2))
    recipe = parse_recipe("version: 1\nsteps:\n  - tli:\n      every: 1\n", "tli_k1.yaml")
    apply_recipe(recipe, source, tmp_path / "out", options=QUIET)

    written = json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"]
    assert written[:4] == ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
    difference = max_logit_difference(source, tmp_path / "out", token_ids(english_text, config["vocab_size"]))
    assert difference <= 1e-5


@pytest.mark.parametrize(
    ("options", "layers"),
    [
        ("every: 4", 7),
        ("every: 4\n      remainder: insert", 8),
        ("every: 6", 7),
        ("every: 3\n      position: before_group", 8),
        ("every: 2\n      copy_from: next", 9),
        ("every: 2\n      copy_from: mean", 9),
    ],
)
def test_tli_options_layer_count_and_identity(options, layers, tiny_models, english_text, tmp_path):
    source = tiny_models["llama"]
    recipe = parse_recipe(f"version: 1\nsteps:\n  - tli:\n      {options}\n", "tli.yaml")
    plan = apply_recipe(recipe, source, tmp_path / "out", options=QUIET)
    assert len(plan.layout.layers) == layers
    difference = max_logit_difference(source, tmp_path / "out", token_ids(english_text, 256))
    assert difference <= 1e-5


def test_tli_mean_copy_averages_neighbours(tiny_models, tmp_path):
    source = tiny_models["llama"]
    recipe = parse_recipe("version: 1\nsteps:\n  - tli:\n      every: 2\n      copy_from: mean\n", "tli.yaml")
    apply_recipe(recipe, source, tmp_path / "out", options=QUIET)
    model_in, _ = load_causal_lm(source)
    model_out, _ = load_causal_lm(tmp_path / "out")
    # Output layer 2 is new, between input layers 1 and 2.
    expected = (model_in.model.layers[1].mlp.gate_proj.weight + model_in.model.layers[2].mlp.gate_proj.weight) / 2
    assert torch.allclose(model_out.model.layers[2].mlp.gate_proj.weight, expected, atol=1e-7)


def test_tli_noise_is_seeded_and_keeps_identity(tiny_models, english_text, tmp_path):
    source = tiny_models["llama"]
    text = "version: 1\nsteps:\n  - tli:\n      every: 3\n      noise: {std: 0.01, seed: 7}\n"
    apply_recipe(parse_recipe(text, "noise.yaml"), source, tmp_path / "first", options=QUIET)
    apply_recipe(parse_recipe(text, "noise.yaml"), source, tmp_path / "second", options=QUIET)
    first, second = tensor_bytes(tmp_path / "first"), tensor_bytes(tmp_path / "second")
    original = tensor_bytes(source)
    assert first == second
    assert first["model.layers.3.mlp.gate_proj.weight"] != original["model.layers.2.mlp.gate_proj.weight"]
    assert max_logit_difference(source, tmp_path / "first", token_ids(english_text, 256)) <= 1e-5


def test_tli_small_shards_load(tiny_models, english_text, tmp_path):
    source = tiny_models["qwen3"]
    recipe = parse_recipe("version: 1\nsteps:\n  - tli:\n      every: 2\n", "tli.yaml")
    plan = apply_recipe(recipe, source, tmp_path / "out", max_shard_size=100_000, options=QUIET)
    assert len(plan.shards) > 3
    assert (tmp_path / "out" / f"model-00001-of-{len(plan.shards):05d}.safetensors").is_file()
    _, info = load_causal_lm(tmp_path / "out")
    assert not info["missing_keys"]
    assert max_logit_difference(source, tmp_path / "out", token_ids(english_text, 256)) <= 1e-5
