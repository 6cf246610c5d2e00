"""The `slices:` section: layer ranges from several models, filters, and errors raised before writing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from surgeon.api import apply_recipe
from surgeon.errors import PlanError, RecipeError
from surgeon.recipe import load_recipe
from tests.models import build_tiny
from tests.surgery_checks import layer_indices, layer_tensors, load_model, read_config, read_tensors, run_cli


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory) -> Path:
    """A folder holding two tiny llamas built with different seeds, `a` and `b`, plus a narrower `narrow`."""
    root = tmp_path_factory.mktemp("slices")
    build_tiny("llama", root / "a", seed=1)
    build_tiny("llama", root / "b", seed=2)
    build_tiny("llama", root / "narrow", seed=3, hidden_size=32)
    return root


def write_recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


FRANKENMERGE = """\
    version: 1
    models:
      a: {a}
      b: {b}
    slices:
      - model: a
        layers: [0, 4]
      - model: b
        layers: [2, 6]
        filters:
          - {{tensors: self_attn.o_proj, scale: 0.0}}
          - {{tensors: mlp.up_proj, scale: 0.5}}
    """


def test_slices_cli_without_input(model_pair, tmp_path):
    recipe_path = write_recipe(tmp_path, FRANKENMERGE.format(a=model_pair / "a", b=model_pair / "b"))
    output = tmp_path / "out"

    result = run_cli("apply", str(recipe_path), str(output), "--quiet")

    assert result.returncode == 0, result.stderr
    assert layer_indices(read_tensors(output)) == set(range(8))
    assert read_config(output)["num_hidden_layers"] == 8


def test_slices_tensors_come_from_named_layers(model_pair, tmp_path):
    recipe_path = write_recipe(tmp_path, FRANKENMERGE.format(a=model_pair / "a", b=model_pair / "b"))
    output = tmp_path / "out"
    apply_recipe(recipe_path, None, output)
    written = read_tensors(output)
    first, second = read_tensors(model_pair / "a"), read_tensors(model_pair / "b")

    for index in range(4):
        for suffix, value in layer_tensors(written, index).items():
            assert torch.equal(value, first[f"model.layers.{index}.{suffix}"]), (index, suffix)
    for index in range(4, 8):
        source_index = index - 2
        for suffix, value in layer_tensors(written, index).items():
            expected = second[f"model.layers.{source_index}.{suffix}"]
            if suffix == "self_attn.o_proj.weight":
                expected = torch.zeros_like(expected)
            elif suffix == "mlp.up_proj.weight":
                expected = expected * 0.5
            assert torch.equal(value, expected), (index, suffix)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(written[name], first[name]), name


def test_slices_head_from_named_model(model_pair, tmp_path):
    text = FRANKENMERGE.format(a=model_pair / "a", b=model_pair / "b") + "head: {model: b}\n"
    output = tmp_path / "out"
    apply_recipe(write_recipe(tmp_path, text), None, output)
    written = read_tensors(output)
    second = read_tensors(model_pair / "b")

    assert torch.equal(written["lm_head.weight"], second["lm_head.weight"])
    assert torch.equal(written["model.norm.weight"], second["model.norm.weight"])


def test_slices_output_loads_in_transformers(model_pair, tmp_path):
    output = tmp_path / "out"
    apply_recipe(write_recipe(tmp_path, FRANKENMERGE.format(a=model_pair / "a", b=model_pair / "b")), None, output)

    model, info = load_model(output)

    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert len(model.model.layers) == 8


def test_slices_identity_reproduces_logits(model_pair, tmp_path):
    text = f"version: 1\nmodels: {{a: {model_pair / 'a'}}}\nslices:\n  - {{model: a, layers: [0, 3]}}\n  - {{model: a, layers: [3, 6]}}\n"
    output = tmp_path / "out"
    apply_recipe(write_recipe(tmp_path, text), None, output)
    token_ids = torch.tensor([list(range(5, 50))])

    with torch.no_grad():
        expected = load_model(model_pair / "a")[0](token_ids).logits
        actual = load_model(output)[0](token_ids).logits

    assert torch.equal(actual, expected)


def test_slices_relative_paths_resolve_beside_recipe(model_pair, tmp_path):
    recipe_path = write_recipe(model_pair, FRANKENMERGE.format(a="a", b="./b"))
    output = tmp_path / "out"

    result = run_cli("apply", str(recipe_path), str(output), "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert layer_indices(read_tensors(output)) == set(range(8))


def test_slices_relative_paths_fall_back_to_cwd(model_pair, tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    recipe_path = write_recipe(recipes, FRANKENMERGE.format(a="a", b="b"))
    output = tmp_path / "out"

    result = run_cli("apply", str(recipe_path), str(output), "--quiet", cwd=model_pair)

    assert result.returncode == 0, result.stderr


def test_slices_on_command_line_input(model_pair, tmp_path):
    text = "version: 1\nslices:\n  - {model: input, layers: [0, 6]}\n  - {model: input, layers: [4, 6]}\n"
    output = tmp_path / "out"
    apply_recipe(write_recipe(tmp_path, text), model_pair / "a", output)

    assert read_config(output)["num_hidden_layers"] == 8


BAD_SLICES = [
    (
        "past_last_layer",
        "version: 1\nmodels: {{a: {a}}}\nslices:\n  - {{model: a, layers: [0, 4]}}\n  - {{model: a, layers: [4, 7]}}\n",
        PlanError,
        "slices[1].layers",
    ),
    (
        "empty_range",
        "version: 1\nmodels: {{a: {a}}}\nslices:\n  - {{model: a, layers: [3, 3]}}\n",
        RecipeError,
        "slices[0].layers",
    ),
    (
        "unknown_model",
        "version: 1\nmodels: {{a: {a}}}\nslices:\n  - {{model: a, layers: [0, 2]}}\n  - {{model: c, layers: [0, 2]}}\n",
        RecipeError,
        "slices[1].model",
    ),
    (
        "hidden_size_mismatch",
        "version: 1\nmodels: {{a: {a}, n: {narrow}}}\nslices:\n  - {{model: a, layers: [0, 2]}}\n  - {{model: n, layers: [0, 2]}}\n",
        PlanError,
        "hidden_size",
    ),
    (
        "filter_matches_nothing",
        "version: 1\nmodels: {{a: {a}}}\nslices:\n  - {{model: a, layers: [0, 2], filters: [{{tensors: o_prj, scale: 0}}]}}\n",
        PlanError,
        "slices[0].filters[0]",
    ),
    (
        "missing_model_folder",
        "version: 1\nmodels: {{a: {a}/missing}}\nslices:\n  - {{model: a, layers: [0, 2]}}\n",
        RecipeError,
        "models.a",
    ),
]


@pytest.mark.parametrize("text, error_type, field", [case[1:] for case in BAD_SLICES], ids=[case[0] for case in BAD_SLICES])
def test_slices_bad_input_rejected_before_writing(text, error_type, field, model_pair, tmp_path):
    recipe_path = write_recipe(tmp_path, text.format(a=model_pair / "a", narrow=model_pair / "narrow"))
    output = tmp_path / "out"

    with pytest.raises(error_type) as raised:
        apply_recipe(load_recipe(recipe_path), None, output)

    assert raised.value.field == field
    assert not output.exists()
    assert not (tmp_path / ".out.surgeon-partial").exists()


def test_slices_mismatch_names_both_values(model_pair, tmp_path):
    text = BAD_SLICES[3][1].format(a=model_pair / "a", narrow=model_pair / "narrow")

    with pytest.raises(PlanError) as raised:
        apply_recipe(write_recipe(tmp_path, text), None, tmp_path / "out")

    assert "64" in str(raised.value)
    assert "32" in str(raised.value)


def test_slices_cli_error_leaves_no_output(model_pair, tmp_path):
    text = BAD_SLICES[0][1].format(a=model_pair / "a")
    output = tmp_path / "out"

    result = run_cli("apply", str(write_recipe(tmp_path, text)), str(output))

    assert result.returncode == 1
    assert "slices[1].layers" in result.stderr
    assert not output.exists()
