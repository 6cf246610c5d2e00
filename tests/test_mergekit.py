"""mergekit passthrough configs: surgeon writes the tensors mergekit writes, and rejects what it cannot run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from surgeon.api import apply_recipe
from surgeon.errors import PlanError, RecipeError
from surgeon.recipe import parse_recipe
from tests.models import build_tiny
from tests.surgery_checks import read_config, read_tensors, run_cli

SOLAR_STYLE = """\
    merge_method: passthrough
    dtype: bfloat16
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 4]
      - sources:
          - model: {a}
            layer_range: [2, 6]
    """

ZERO_FILTERS = """\
    merge_method: passthrough
    parameters:
      scale:
        - filter: gate_proj
          value: 0.3
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 6]
      - sources:
          - model: {a}
            layer_range: [3, 6]
            parameters:
              scale:
                - filter: o_proj
                  value: 0.0
                - filter: down_proj
                  value: 0.0
    """

FRANKENMERGE = """\
    merge_method: passthrough
    dtype: float32
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 4]
      - sources:
          - model: {b}
            layer_range: [2, 6]
            parameters:
              scale: [{{filter: o_proj, value: 0.7}}, {{value: 1.0}}]
    """


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mergekit")
    build_tiny("llama", root / "a", seed=1)
    build_tiny("llama", root / "b", seed=2)
    return root


def run_mergekit(config_text: str, output: Path) -> None:
    """Run mergekit's own merge on a config, in this process."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    configuration = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    run_merge(configuration, str(output), MergeOptions(copy_tokenizer=False, allow_crimes=True, lazy_unpickle=True, quiet=True))


@pytest.mark.parametrize("config", [SOLAR_STYLE, ZERO_FILTERS, FRANKENMERGE], ids=["solar_style", "zero_filters", "frankenmerge"])
def test_mergekit_same_tensors(config, model_pair, tmp_path):
    pytest.importorskip("mergekit")
    text = textwrap.dedent(config).format(a=model_pair / "a", b=model_pair / "b")
    config_path = tmp_path / "config.yml"
    config_path.write_text(text)
    run_mergekit(text, tmp_path / "mergekit")

    result = run_cli("apply", str(config_path), str(tmp_path / "surgeon"), "--quiet")
    assert result.returncode == 0, result.stderr

    expected = read_tensors(tmp_path / "mergekit")
    actual = read_tensors(tmp_path / "surgeon")
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert actual[name].shape == value.shape, name
        assert torch.equal(actual[name], value), name
    assert read_config(tmp_path / "surgeon")["num_hidden_layers"] == read_config(tmp_path / "mergekit")["num_hidden_layers"]


def test_mergekit_recipe_format_recorded(model_pair, tmp_path):
    loaded = parse_recipe(textwrap.dedent(SOLAR_STYLE).format(a=model_pair / "a"), "config.yml")

    assert loaded.source_format == "mergekit"
    assert [s.layers for s in loaded.recipe.slices] == [(0, 4), (2, 6)]
    assert loaded.recipe.dtype == "BF16"


def test_mergekit_filter_precedence_source_first(model_pair):
    loaded = parse_recipe(textwrap.dedent(ZERO_FILTERS).format(a=model_pair / "a"), "config.yml")
    second = loaded.recipe.slices[1].filters

    assert [f.name_contains for f in second] == ["o_proj", "down_proj", "gate_proj"]
    assert [f.scale for f in second] == [0.0, 0.0, 0.3]


UNSUPPORTED = [
    ("other_method", "merge_method: slerp\nslices: []\n", "merge_method"),
    ("models_list", "merge_method: passthrough\nmodels:\n  - model: a\n", "models"),
    ("out_dtype", "merge_method: passthrough\nout_dtype: float16\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n", "out_dtype"),
    (
        "gradient",
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2], parameters: {scale: [0.0, 1.0]}}\n",
        "slices[0].sources[0].parameters.scale",
    ),
    (
        "tokenizer_union",
        "merge_method: passthrough\ntokenizer_source: union\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n",
        "tokenizer_source",
    ),
    (
        "two_sources",
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n      - {model: b, layer_range: [0, 2]}\n",
        "slices[0].sources",
    ),
    (
        "other_parameter",
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2], parameters: {weight: 0.5}}\n",
        "slices[0].sources[0].parameters.weight",
    ),
    (
        "empty_layer_range",
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [2, 2]}\n",
        "slices[0].sources[0].layer_range",
    ),
    ("residual_weight", "merge_method: passthrough\nslices:\n  - sources: []\n    residual_weight: 0.1\n", "slices[0].residual_weight"),
    ("lora_reference", "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a+lora, layer_range: [0, 2]}\n", "slices[0].sources[0].model"),
]


@pytest.mark.parametrize("text, field", [case[1:] for case in UNSUPPORTED], ids=[case[0] for case in UNSUPPORTED])
def test_mergekit_unsupported_option_rejected(text, field):
    with pytest.raises(RecipeError) as raised:
        parse_recipe(text, "config.yml")

    assert raised.value.field == field
    assert raised.value.line is not None


def test_mergekit_range_past_end_writes_nothing(model_pair, tmp_path):
    text = f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {model_pair / 'a'}, layer_range: [4, 9]}}\n"
    output = tmp_path / "out"

    with pytest.raises(PlanError) as raised:
        apply_recipe(parse_recipe(text, "config.yml"), None, output)

    assert raised.value.field == "slices[0].sources[0].layer_range"
    assert not output.exists()
