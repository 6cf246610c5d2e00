"""The recipe `dtype` option: converted tensors are computed, unconverted ones stay byte copies."""

from __future__ import annotations

import pytest
import torch

from surgeon.api import apply_recipe, plan_recipe
from surgeon.recipe import parse_recipe
from tests.surgery_checks import read_config, read_tensors

DTYPE_RECIPE = "version: 1\ndtype: {dtype}\nsteps:\n  - dus: {{overlap: 1}}\n"


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype_conversion_matches_torch(dtype, torch_dtype, tiny_models, tmp_path):
    output = tmp_path / "out"
    apply_recipe(parse_recipe(DTYPE_RECIPE.format(dtype=dtype)), tiny_models["llama"], output)
    source = read_tensors(tiny_models["llama"])
    converted = read_tensors(output)

    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight"):
        assert converted[name].dtype == torch_dtype, name
        assert torch.equal(converted[name], source[name].to(torch_dtype)), name
    assert read_config(output)["dtype"] == dtype


def test_dtype_conversion_is_computed(tiny_models):
    plan = plan_recipe(parse_recipe(DTYPE_RECIPE.format(dtype="bfloat16")), tiny_models["llama"])

    assert {tensor.kind for tensor in plan.tensors} == {"computed"}


def test_dtype_same_as_input_stays_copy(tiny_models, tmp_path):
    recipe = parse_recipe(DTYPE_RECIPE.format(dtype="float32"))
    plan = plan_recipe(recipe, tiny_models["llama"])
    output = tmp_path / "out"
    apply_recipe(recipe, tiny_models["llama"], output)
    source = read_tensors(tiny_models["llama"])
    written = read_tensors(output)

    assert {tensor.kind for tensor in plan.tensors} == {"copy"}
    assert torch.equal(written["model.layers.9.self_attn.q_proj.weight"], source["model.layers.5.self_attn.q_proj.weight"])


def test_dtype_rounding_ties_to_even():
    import numpy as np

    from surgeon.dtypes import decode, encode

    # Values halfway between two bf16 numbers, plus ordinary ones, rounded by numpy code and by torch.
    values = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5e-3, 3.14159, 65504.0, 1e-40], dtype=np.float32)
    ours = decode(encode(values, "BF16"), "BF16", values.size)
    theirs = torch.from_numpy(values).to(torch.bfloat16).to(torch.float32).numpy()

    assert np.array_equal(ours, theirs)
