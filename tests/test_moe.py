"""The moe step: dense checkpoints upcycled into Mixtral and Qwen MoE models that transformers loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from surgeon.api import apply_recipe, plan_recipe
from surgeon.checkpoint import open_checkpoint
from surgeon.errors import ArchitectureError, PlanError, RecipeError
from surgeon.plan.expressions import ColumnSlice, Concatenated, PartialReinit, Precomputed, RowSlice
from surgeon.recipe.loader import parse_recipe
from surgeon.writer import WriteOptions
from tests.models import build_tiny

QUIET = WriteOptions(progress=False)
MOE_CLASSES = {
    "llama": "MixtralForCausalLM",
    "mistral": "MixtralForCausalLM",
    "qwen2": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3MoeForCausalLM",
}


def moe_recipe(**options) -> str:
    fields = ", ".join(f"{key}: {value}" for key, value in options.items())
    return f"version: 1\nsteps:\n  - moe: {{{fields}}}\n"


def upcycle(text: str, source: Path, output: Path) -> Path:
    apply_recipe(parse_recipe(text), source, output, options=QUIET)
    return output


def load(folder: Path):
    """Load a checkpoint with transformers; return the model and its loading report."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    return model.eval(), info


def logits(model, token_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids).logits


@pytest.fixture(scope="module")
def random_tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 24), generator=generator)


@pytest.fixture(scope="module")
def smollm2_tokens(smollm2_dir, english_text) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    return tokenizer(english_text, return_tensors="pt")["input_ids"][:, :256]


@pytest.fixture(scope="module")
def smollm2_moe(smollm2_dir, tmp_path_factory) -> Path:
    text = moe_recipe(experts=4, experts_per_token=2)
    return upcycle(text, smollm2_dir, tmp_path_factory.mktemp("smollm2") / "moe")


def test_smollm2_loads_as_mixtral(smollm2_moe):
    model, info = load(smollm2_moe)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]


def test_smollm2_mixtral_logits_match_dense(smollm2_dir, smollm2_moe, smollm2_tokens):
    dense, _ = load(smollm2_dir)
    moe, _ = load(smollm2_moe)
    difference = (logits(moe, smollm2_tokens) - logits(dense, smollm2_tokens)).abs().max().item()
    print(f"SmolLM2 4x top-2 Mixtral vs dense: max |logit difference| = {difference:.3g} over {smollm2_tokens.shape[1]} tokens")
    assert difference <= 1e-4


def test_smollm2_experts_are_byte_copies(smollm2_dir, smollm2_moe):
    dense = open_checkpoint(smollm2_dir)
    moe = open_checkpoint(smollm2_moe)
    pairs = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    for expert in range(4):
        for expert_name, dense_name in pairs.items():
            source = dense.tensors[f"model.layers.7.mlp.{dense_name}.weight"]
            copy = moe.tensors[f"model.layers.7.block_sparse_moe.experts.{expert}.{expert_name}.weight"]
            assert moe.read(copy, 0, copy.nbytes) == dense.read(source, 0, source.nbytes), f"expert {expert} {expert_name}"


@pytest.mark.parametrize("arch", sorted(MOE_CLASSES))
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_tiny_moe_matches_dense(arch, layout, tiny_models, tmp_path, random_tokens):
    output = upcycle(moe_recipe(experts=4, experts_per_token=2, layout=layout), tiny_models[arch], tmp_path / "moe")
    dense, _ = load(tiny_models[arch])
    moe, info = load(output)
    difference = (logits(moe, random_tokens) - logits(dense, random_tokens)).abs().max().item()
    print(f"{arch} {layout}: max |logit difference| = {difference:.3g}")
    assert type(moe).__name__ == MOE_CLASSES[arch]
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert difference <= 1e-5


def test_fused_layout_writes_only_byte_copies(tiny_models):
    plan = plan_recipe(parse_recipe(moe_recipe(experts=3, experts_per_token=2, layout="fused")), tiny_models["llama"])
    gate_up = dict((tensor.name, tensor.expr) for tensor in plan.tensors)["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (3, 2 * 128, 64)
    assert all(part.byte_range() is not None for part in gate_up.parts())


def test_fused_layout_converts_dtype(tiny_models, tmp_path, random_tokens):
    text = "version: 1\ndtype: bfloat16\nsteps:\n  - moe: {experts: 2, experts_per_token: 1, layout: fused}\n"
    output = upcycle(text, tiny_models["qwen3"], tmp_path / "moe")
    moe, info = load(output)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert open_checkpoint(output).tensors["model.layers.0.mlp.experts.down_proj"].dtype == "BF16"


def test_qwen_partial_layers_stay_dense(tiny_models, tmp_path, random_tokens):
    output = upcycle(moe_recipe(experts=4, experts_per_token=2, layers=[1, 3]), tiny_models["qwen2"], tmp_path / "moe")
    moe, info = load(output)
    dense, _ = load(tiny_models["qwen2"])
    difference = (logits(moe, random_tokens) - logits(dense, random_tokens)).abs().max().item()
    assert moe.config.mlp_only_layers == [0, 2, 4, 5]
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert "model.layers.0.mlp.gate_proj.weight" in open_checkpoint(output).tensors
    assert difference <= 1e-5


def test_mixtral_partial_layers_rejected(tiny_models):
    with pytest.raises(ArchitectureError, match="every layer must become sparse"):
        plan_recipe(parse_recipe(moe_recipe(experts=4, experts_per_token=2, layers=[0])), tiny_models["llama"])


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "phi3"])
def test_unsupported_architecture_rejected(arch, tiny_models):
    with pytest.raises(ArchitectureError) as raised:
        plan_recipe(parse_recipe(moe_recipe(experts=4, experts_per_token=2)), tiny_models[arch])
    assert "llama, mistral, qwen2, qwen3" in raised.value.message
    assert raised.value.field == "steps[0].moe"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(experts=2, experts_per_token=3), "exceeds the number of experts"),
        (dict(experts=1, experts_per_token=1), "greater than or equal to 2"),
        (dict(experts=2, experts_per_token=1, router="{init: random}"), "needs `std`"),
        (dict(experts=2, experts_per_token=1, router="{init: hidden}"), "needs `prompts`"),
        (dict(experts=2, experts_per_token=1, router="{init: hidden, prompts: [[a]]}"), "one list per expert"),
        (dict(experts=2, experts_per_token=1, router="{init: zeros, std: 1}"), "applies only to router init 'random'"),
        (dict(experts=2, experts_per_token=1, layout="stacked"), "per_expert"),
    ],
)
def test_invalid_options_rejected(options, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(moe_recipe(**options))


def test_granularity_indivisible_rejected(tiny_models):
    with pytest.raises(PlanError, match="does not divide intermediate_size 128"):
        plan_recipe(parse_recipe(moe_recipe(experts=2, experts_per_token=2, granularity=3)), tiny_models["llama"])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fine_grained_all_experts_keeps_function(arch, tiny_models, tmp_path, random_tokens):
    output = upcycle(moe_recipe(experts=2, experts_per_token=8, granularity=4), tiny_models[arch], tmp_path / "moe")
    moe, info = load(output)
    dense, _ = load(tiny_models[arch])
    difference = (logits(moe, random_tokens) - logits(dense, random_tokens)).abs().max().item()
    print(f"{arch} 2 copies x 4 slices, all 8 experts active: max |logit difference| = {difference:.3g}")
    assert not info["unexpected_keys"]
    assert difference <= 1e-5


def test_fine_grained_sparse_topk_changes_function(tiny_models, tmp_path, random_tokens):
    output = upcycle(moe_recipe(experts=2, experts_per_token=2, granularity=4), tiny_models["llama"], tmp_path / "moe")
    moe, _ = load(output)
    dense, _ = load(tiny_models["llama"])
    difference = (logits(moe, random_tokens) - logits(dense, random_tokens)).abs().max().item()
    print(f"llama 2 copies x 4 slices, top-2 of 8: max |logit difference| = {difference:.3g}")
    assert difference > 1e-3


def test_random_router_is_seeded(tiny_models):
    text = moe_recipe(experts=4, experts_per_token=2, router="{init: random, std: 0.5, seed: 3}")
    first = plan_recipe(parse_recipe(text), tiny_models["llama"]).layout.layers[2].tensors["block_sparse_moe.gate.weight"]
    second = plan_recipe(parse_recipe(text), tiny_models["llama"]).layout.layers[2].tensors["block_sparse_moe.gate.weight"]
    values = first.read_rows(0, 4)
    assert np.array_equal(values, second.read_rows(0, 4))
    assert 0.4 < values.std() < 0.6


def test_random_router_keeps_function(tiny_models, tmp_path, random_tokens):
    text = moe_recipe(experts=4, experts_per_token=2, router="{init: random, std: 1.0}")
    moe, _ = load(upcycle(text, tiny_models["mistral"], tmp_path / "moe"))
    dense, _ = load(tiny_models["mistral"])
    assert (logits(moe, random_tokens) - logits(dense, random_tokens)).abs().max().item() <= 1e-5


def test_expert_noise_makes_experts_differ(tiny_models, tmp_path, random_tokens):
    text = moe_recipe(experts=2, experts_per_token=1, noise="{std: 0.01, seed: 1, projections: [up]}")
    output = upcycle(text, tiny_models["llama"], tmp_path / "moe")
    checkpoint = open_checkpoint(output)
    first = checkpoint.tensors["model.layers.0.block_sparse_moe.experts.0.w3.weight"]
    second = checkpoint.tensors["model.layers.0.block_sparse_moe.experts.1.w3.weight"]
    gate = [checkpoint.tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"] for e in range(2)]
    assert checkpoint.read(first, 0, first.nbytes) != checkpoint.read(second, 0, second.nbytes)
    assert checkpoint.read(gate[0], 0, gate[0].nbytes) == checkpoint.read(gate[1], 0, gate[1].nbytes)


def test_drop_upcycling_redraws_ratio_of_units(tiny_models):
    text = moe_recipe(experts=2, experts_per_token=1, drop_upcycling="{ratio: 0.25, seed: 5}")
    plan = plan_recipe(parse_recipe(text), tiny_models["llama"])
    layer = plan.layout.layers[1].tensors
    dense = open_checkpoint(tiny_models["llama"])
    dense_up = np.frombuffer(dense.read(dense.tensors["model.layers.1.mlp.up_proj.weight"], 0, 128 * 64 * 4), np.float32).reshape(128, 64)
    dense_down = np.frombuffer(dense.read(dense.tensors["model.layers.1.mlp.down_proj.weight"], 0, 64 * 128 * 4), np.float32).reshape(64, 128)
    up = layer["block_sparse_moe.experts.0.w3.weight"].read_rows(0, 128).reshape(128, 64)
    down = layer["block_sparse_moe.experts.0.w2.weight"].read_rows(0, 64).reshape(64, 128)
    other_up = layer["block_sparse_moe.experts.1.w3.weight"].read_rows(0, 128).reshape(128, 64)
    changed_rows = np.flatnonzero((up != dense_up).any(axis=1))
    changed_columns = np.flatnonzero((down != dense_down).any(axis=0))
    assert len(changed_rows) == 32
    assert np.array_equal(changed_rows, changed_columns)
    assert not np.array_equal(up, other_up)
    assert abs(up[changed_rows].std() - dense_up.std()) < 0.2 * dense_up.std()


def test_drop_upcycling_loads(tiny_models, tmp_path):
    text = moe_recipe(experts=2, experts_per_token=1, layout="fused", drop_upcycling="{ratio: 0.5}")
    _, info = load(upcycle(text, tiny_models["qwen2"], tmp_path / "moe"))
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]


@pytest.fixture(scope="module")
def tiny_llama_with_tokenizer(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny Llama with SmolLM2's vocabulary size and tokenizer files, so prompts can run through it."""
    folder = build_tiny("llama", tmp_path_factory.mktemp("tokenized") / "llama", vocab_size=49152)
    for path in smollm2_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, folder / path.name)
    return folder


HIDDEN_ROUTER = '{init: hidden, prompts: [["def add(a, b): return a + b", "import numpy as np"], ["The cat sat on the mat."]]}'


def test_hidden_router_matches_full_forward(tiny_llama_with_tokenizer):
    plan = plan_recipe(parse_recipe(moe_recipe(experts=2, experts_per_token=1, router=HIDDEN_ROUTER)), tiny_llama_with_tokenizer)
    router = plan.layout.layers[3].tensors["block_sparse_moe.gate.weight"].read_rows(0, 2).reshape(2, 64)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_with_tokenizer)
    model, _ = load(tiny_llama_with_tokenizer)

    def mean_state(prompt: str) -> torch.Tensor:
        with torch.no_grad():
            states = model(**tokenizer(prompt, return_tensors="pt"), output_hidden_states=True).hidden_states
        return states[3][0].double().mean(dim=0)

    expected = (mean_state("def add(a, b): return a + b") + mean_state("import numpy as np")) / 2
    expected = (expected / expected.norm()).numpy()
    assert np.abs(router[0] - expected).max() <= 1e-5
    assert np.allclose(np.linalg.norm(router, axis=1), 1.0, atol=1e-5)


def test_hidden_router_keeps_function(tiny_llama_with_tokenizer, tmp_path, random_tokens):
    output = upcycle(moe_recipe(experts=2, experts_per_token=1, router=HIDDEN_ROUTER), tiny_llama_with_tokenizer, tmp_path / "moe")
    moe, info = load(output)
    dense, _ = load(tiny_llama_with_tokenizer)
    assert not info["unexpected_keys"]
    assert (logits(moe, random_tokens) - logits(dense, random_tokens)).abs().max().item() <= 1e-5


def test_concatenated_rows_match_numpy():
    first = Precomputed(np.arange(12.0).reshape(3, 4), "F32", "first")
    second = Precomputed(np.arange(12.0, 20.0).reshape(2, 4), "F32", "second")
    stacked = Concatenated([first, second], (5, 2, 2))
    expected = np.arange(20.0).reshape(5, 4)
    for start, stop in [(0, 5), (1, 4), (2, 3), (4, 5)]:
        assert np.array_equal(stacked.read_rows(start, stop), expected[start:stop].reshape(-1)), (start, stop)


def test_column_slice_rows_match_numpy():
    values = np.arange(24.0).reshape(4, 6)
    columns = ColumnSlice(Precomputed(values, "F32", "values"), 2, 5)
    assert np.array_equal(columns.read_rows(1, 3), values[1:3, 2:5].reshape(-1))


def test_partial_reinit_chunking_invariant():
    generator = np.random.default_rng(0)
    source = Precomputed(generator.normal(size=(10, 8)), "F32", "values")
    for axis in (0, 1):
        redrawn = PartialReinit(RowSlice(source, 0, 10), axis, np.array([1, 6]), seed=9)
        whole = redrawn.read_rows(0, 10)
        pieces = np.concatenate([redrawn.read_rows(0, 3), redrawn.read_rows(3, 10)])
        assert np.array_equal(whole, pieces), f"axis {axis}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_moe_output_passes_verify(arch, tiny_models, tmp_path):
    from surgeon.verify import verify_output

    output = upcycle(moe_recipe(experts=2, experts_per_token=1), tiny_models[arch], tmp_path / "out")
    verify_output(output)


def test_tli_on_moe_output_keeps_function(tiny_models, tmp_path, random_tokens):
    moe = upcycle(moe_recipe(experts=2, experts_per_token=2), tiny_models["llama"], tmp_path / "moe")
    grown = tmp_path / "grown"
    apply_recipe(parse_recipe("version: 1\nsteps:\n  - tli: {every: 3}\n", "tli.yaml"), moe, grown, options=WriteOptions(progress=False))
    grown_model, info = load(grown)
    difference = (logits(load(moe)[0], random_tokens) - logits(grown_model, random_tokens)).abs().max().item()
    assert not info["missing_keys"]
    assert difference <= 1e-5


def test_qwen3_mixed_attention_kinds_rejected(tmp_path):
    source = build_tiny("qwen3", tmp_path / "qwen3", use_sliding_window=True, sliding_window=8, max_window_layers=3)
    with pytest.raises(ArchitectureError, match="mixes sliding-window and full-attention"):
        plan_recipe(parse_recipe(moe_recipe(experts=2, experts_per_token=1), "moe.yaml"), source)


def test_layer_count_change_after_partial_moe_rejected(tiny_models):
    text = (
        "version: 1\nsteps:\n  - moe: {experts: 2, experts_per_token: 1, layers: [0, 2, 4]}\n"
        "  - stack: {times: 2}\n"
    )
    with pytest.raises(PlanError, match="mlp_only_layers"):
        plan_recipe(parse_recipe(text, "moe_stack.yaml"), tiny_models["qwen2"])
