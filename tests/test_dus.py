"""Depth growth steps: DUS, stack and block expansion, on SmolLM2 and tiny checkpoints."""

from __future__ import annotations

import textwrap

import pytest
import torch

from surgeon.api import apply_recipe
from surgeon.errors import PlanError
from surgeon.recipe import parse_recipe
from tests.surgery_checks import REPO_ROOT, layer_indices, layer_tensors, load_model, read_config, read_tensors

DUS_RECIPE = REPO_ROOT / "recipes" / "dus_solar.yaml"


def recipe(text: str):
    return parse_recipe(textwrap.dedent(text), "<test>")


@pytest.fixture(scope="module")
def smollm2_dus(smollm2_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("dus") / "smollm2-dus"
    apply_recipe(DUS_RECIPE, smollm2_dir, output)
    return output


def test_dus_smollm2_has_44_layers(smollm2_dus):
    tensors = read_tensors(smollm2_dus)

    assert layer_indices(tensors) == set(range(44))
    assert read_config(smollm2_dus)["num_hidden_layers"] == 44


def test_dus_smollm2_loads_without_key_errors(smollm2_dus):
    model, info = load_model(smollm2_dus)

    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert len(model.model.layers) == 44


def test_dus_smollm2_per_layer_fields_match(smollm2_dus):
    from surgeon.architectures import ARCHITECTURES

    config = read_config(smollm2_dus)
    for field_name in ARCHITECTURES["llama"].per_layer_fields:
        assert field_name not in config or len(config[field_name]) == 44, field_name


def test_dus_smollm2_second_copy_is_byte_copy(smollm2_dus, smollm2_dir):
    output = read_tensors(smollm2_dus)
    source = read_tensors(smollm2_dir)

    # Output layer 22 starts the second copy, which begins at source layer 8.
    for suffix, value in layer_tensors(output, 22).items():
        assert torch.equal(value, source[f"model.layers.8.{suffix}"]), suffix
    for suffix, value in layer_tensors(output, 43).items():
        assert torch.equal(value, source[f"model.layers.29.{suffix}"]), suffix


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3_text", "qwen3", "phi3"])
def test_dus_tiny_layer_order_and_types(arch, tiny_models, tmp_path):
    output = tmp_path / "out"
    apply_recipe(recipe("version: 1\nsteps:\n  - dus: {overlap: 2}\n"), tiny_models[arch], output)
    source_tensors = read_tensors(tiny_models[arch])
    output_tensors = read_tensors(output)
    expected_sources = [0, 1, 2, 3, 2, 3, 4, 5]

    assert layer_indices(output_tensors) == set(range(8))
    for index, source_index in enumerate(expected_sources):
        for suffix, value in layer_tensors(output_tensors, index).items():
            assert torch.equal(value, source_tensors[f"model.layers.{source_index}.{suffix}"]), (index, suffix)

    _, info = load_model(output)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]

    source_config = read_config(tiny_models[arch])
    output_config = read_config(output)
    if "layer_types" in source_config:
        assert output_config["layer_types"] == [source_config["layer_types"][i] for i in expected_sources]


def test_dus_overlap_above_half_rejected(tiny_models, tmp_path):
    output = tmp_path / "out"

    with pytest.raises(PlanError) as raised:
        apply_recipe(recipe("version: 1\nsteps:\n  - dus: {overlap: 4}\n"), tiny_models["llama"], output)

    assert raised.value.field == "steps[0].dus.overlap"
    assert not output.exists()


def test_stack_repeats_whole_stack(tiny_models, tmp_path):
    output = tmp_path / "out"
    apply_recipe(recipe("version: 1\nsteps:\n  - stack: {times: 2}\n"), tiny_models["llama"], output)
    source_tensors = read_tensors(tiny_models["llama"])
    output_tensors = read_tensors(output)

    assert layer_indices(output_tensors) == set(range(12))
    for index in range(12):
        for suffix, value in layer_tensors(output_tensors, index).items():
            assert torch.equal(value, source_tensors[f"model.layers.{index % 6}.{suffix}"]), (index, suffix)


def logits(folder, token_ids):
    model, _ = load_model(folder)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits


@pytest.mark.parametrize(
    "options, layers",
    [
        ("{blocks: 3}", 9),
        ("{blocks: 2, span: [0.0, 0.5], copy_from: mean}", 8),
    ],
    ids=["llama_pro", "slayer_shallow_half_mean"],
)
def test_block_expansion_keeps_logits(options, layers, tiny_models, tmp_path):
    output = tmp_path / "out"
    apply_recipe(recipe(f"version: 1\nsteps:\n  - block_expansion: {options}\n"), tiny_models["llama"], output)
    token_ids = list(range(3, 40))

    assert read_config(output)["num_hidden_layers"] == layers
    assert torch.allclose(logits(output, token_ids), logits(tiny_models["llama"], token_ids), atol=1e-5, rtol=0)


def test_block_expansion_positions_llama_pro():
    from surgeon.plan.steps.block_expansion import insertion_points
    from surgeon.recipe.schema import BlockExpansionStep

    assert insertion_points(32, BlockExpansionStep(blocks=8)) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert insertion_points(32, BlockExpansionStep(blocks=8, span=(0.0, 0.5))) == [1, 3, 5, 7, 9, 11, 13, 15]


def test_block_expansion_too_many_blocks(tiny_models, tmp_path):
    with pytest.raises(PlanError) as raised:
        apply_recipe(recipe("version: 1\nsteps:\n  - block_expansion: {blocks: 4, span: [0.0, 0.5]}\n"), tiny_models["llama"], tmp_path / "out")

    assert raised.value.field == "steps[0].block_expansion.blocks"


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "recipes").glob("*.yaml")), ids=lambda path: path.stem)
def test_shipped_recipe_parses_with_description(path):
    from surgeon.recipe import load_recipe

    loaded = load_recipe(path)

    assert loaded.recipe.description
    assert path.read_text().startswith("# Run: surgeon apply recipes/")
