"""Tests for `surgeon.train`: data packing, parameter selection, the training loop, resume, DDP, FSDP2, eval and plot.

All models here are tiny random Llamas (4 layers, hidden size 64) with a
512-token BPE tokenizer trained on a licence text, so the file runs in well
under three minutes on two CPU cores. The multi-process tests launch
`torch.distributed.run` on 127.0.0.1 with the gloo backend.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from surgeon.errors import TrainingError  # noqa: E402
from surgeon.train import data as train_data  # noqa: E402
from surgeon.train.checkpoints import capture_rng_state, restore_rng_state  # noqa: E402
from surgeon.train.commands import eval_command, plot_command, train_command  # noqa: E402
from surgeon.train.evaluate import choose_autocast_dtype, choose_device, evaluate_model  # noqa: E402
from surgeon.train.plot import run_labels  # noqa: E402
from surgeon.train.selection import select_trainable_parameters  # noqa: E402
from surgeon.train.trainer import TrainConfig, WarmupCosineSchedule, build_optimizer, train  # noqa: E402
from tests.models import TINY_ARCHITECTURES, build_tiny  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
LICENSES = Path("/usr/share/common-licenses")
TRAIN_TEXT = LICENSES / "Apache-2.0"
HELD_OUT_TEXT = LICENSES / "MPL-2.0"
NEW_LAYERS = (1, 3)

# Settings shared by the training runs below: 6 steps of 4 windows of 64 tokens.
TINY_RUN = {"seq_len": 64, "steps": 6, "warmup_steps": 2, "lr": 1e-3, "batch_size": 4}

os.environ["HF_HUB_OFFLINE"] = "1"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama with tied embeddings and a 512-token byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not TRAIN_TEXT.is_file():
        pytest.skip(f"{TRAIN_TEXT} is missing; it comes with Debian's base-files package")

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer_model = Tokenizer(models.BPE())
    tokenizer_model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer_model.decoder = decoders.ByteLevel()
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer_model.train([str(TRAIN_TEXT)], bpe_trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_model, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(folder)

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def injected_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a surgeon.json that marks layers 1 and 3 as injected."""
    import shutil

    folder = tmp_path_factory.mktemp("injected-llama") / "model"
    shutil.copytree(tiny_llama_dir, folder)
    layers = []
    for index in range(4):
        new = index in NEW_LAYERS
        layers.append(
            {"index": index, "new": new, "source_model": "input", "source_layer": index - 1 if new else index, "init": "copy"}
        )
    (folder / "surgeon.json").write_text(json.dumps({"layers": layers}), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 4, 6 steps, with held-out evaluation every 3 steps."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    train(TrainConfig(checkpoint=tiny_llama_dir, data=[TRAIN_TEXT], eval_data=[HELD_OUT_TEXT], eval_every=3, out=out, **TINY_RUN))
    return out


def load_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_torchrun(tmp_path: Path, arguments: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """Run `surgeon train ARGUMENTS` under torchrun with `processes` CPU processes on 127.0.0.1."""
    launcher = tmp_path / "launch_train.py"
    launcher.write_text("from surgeon.train.commands import train_command\ntrain_command()\n", encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(launcher),
        *arguments,
    ]
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def tiny_run_arguments(checkpoint: Path, out: Path, batch_size: int) -> list[str]:
    return [
        str(checkpoint),
        "--data", str(TRAIN_TEXT),
        "--eval-data", str(HELD_OUT_TEXT),
        "--out", str(out),
        "--seq-len", str(TINY_RUN["seq_len"]),
        "--steps", str(TINY_RUN["steps"]),
        "--warmup-steps", str(TINY_RUN["warmup_steps"]),
        "--lr", str(TINY_RUN["lr"]),
        "--batch-size", str(batch_size),
        "--eval-every", "3",
    ]  # fmt: skip


# ---------------------------------------------------------------- data


def test_read_documents_jsonl_text_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n', encoding="utf-8")

    assert train_data.read_documents([path]) == ["first", "second"]


def test_read_documents_jsonl_missing_text_raises(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "first"}\n{"body": "second"}\n', encoding="utf-8")

    with pytest.raises(TrainingError) as raised:
        train_data.read_documents([path])
    assert raised.value.line == 2


def test_read_documents_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="not found"):
        train_data.read_documents([tmp_path / "absent.txt"])


def test_tokenize_documents_ends_each_with_eos(tiny_llama_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    stream = train_data.tokenize_documents(tokenizer, ["one licence", "two"])

    eos_positions = (stream == tokenizer.eos_token_id).nonzero().flatten().tolist()
    assert len(eos_positions) == 2
    assert eos_positions[-1] == stream.numel() - 1


def test_pack_windows_drops_remainder() -> None:
    windows = train_data.pack_windows(torch.arange(10), 4)

    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_pack_windows_too_little_data_raises() -> None:
    with pytest.raises(TrainingError, match="fewer than one window"):
        train_data.pack_windows(torch.arange(3), 4)


def test_split_eval_windows_keeps_remainder() -> None:
    windows = train_data.split_eval_windows(torch.arange(11), 4)

    assert [window.tolist() for window in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


def test_split_eval_windows_drops_single_token_tail() -> None:
    windows = train_data.split_eval_windows(torch.arange(9), 4)

    assert len(windows) == 2


def test_batch_windows_splits_on_length_change() -> None:
    windows = train_data.split_eval_windows(torch.arange(11), 4)
    batches = train_data.batch_windows(windows, batch_size=8)

    assert [tuple(batch.shape) for batch in batches] == [(2, 4), (1, 3)]


def test_micro_batch_world_size_invariant() -> None:
    packed = train_data.PackedWindows(torch.arange(40).view(20, 2), seed=3)
    layouts = {
        "1 process, batch 4": train_data.BatchLayout(per_process_batch=4, world_size=1, grad_accum=1),
        "2 processes, batch 2": train_data.BatchLayout(per_process_batch=2, world_size=2, grad_accum=1),
        "1 process, batch 2, accumulation 2": train_data.BatchLayout(per_process_batch=2, world_size=1, grad_accum=2),
        "2 processes, batch 1, accumulation 2": train_data.BatchLayout(per_process_batch=1, world_size=2, grad_accum=2),
    }

    global_batches = {}
    for name, layout in layouts.items():
        rows = []
        for step_start in (0, 4, 8, 16, 20):  # 20 crosses into the second epoch
            for micro_step in range(layout.grad_accum):
                for rank in range(layout.world_size):
                    rows.extend(packed.micro_batch(step_start, layout, micro_step, rank)[:, 0].tolist())
        global_batches[name] = rows

    reference = global_batches["1 process, batch 4"]
    for name, rows in global_batches.items():
        assert rows == reference, name


def test_packed_windows_reshuffle_each_epoch() -> None:
    packed = train_data.PackedWindows(torch.arange(64).view(32, 2), seed=0)

    assert not torch.equal(packed.epoch_order(0), packed.epoch_order(1))
    assert sorted(packed.epoch_order(1).tolist()) == list(range(32))


def test_packed_windows_order_depends_only_on_seed() -> None:
    first = train_data.PackedWindows(torch.arange(64).view(32, 2), seed=5)
    second = train_data.PackedWindows(torch.arange(64).view(32, 2), seed=5)

    assert torch.equal(first.window_indices(30, 10), second.window_indices(30, 10))


# ---------------------------------------------------------------- parameter selection and optimizer


def load_tiny_model(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_select_new_trains_only_marked_layers(injected_llama_dir: Path) -> None:
    model = load_tiny_model(injected_llama_dir)
    names = select_trainable_parameters(model, ["new"], injected_llama_dir)

    prefixes = tuple(f"model.layers.{index}." for index in NEW_LAYERS)
    assert names
    assert all(name.startswith(prefixes) for name in names)
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    assert all(not name.startswith(prefixes) for name in frozen)


def test_select_new_without_manifest_raises(tiny_llama_dir: Path) -> None:
    model = load_tiny_model(tiny_llama_dir)

    with pytest.raises(TrainingError, match="surgeon.json"):
        select_trainable_parameters(model, ["new"], tiny_llama_dir)


def test_select_new_manifest_without_new_layers_raises(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "surgeon.json").write_text(json.dumps({"layers": [{"index": 0, "new": False}]}), encoding="utf-8")
    model = load_tiny_model(tiny_llama_dir)

    with pytest.raises(TrainingError, match="no layer as new"):
        select_trainable_parameters(model, ["new"], tmp_path)


def test_select_glob_and_regex_union(tiny_llama_dir: Path) -> None:
    model = load_tiny_model(tiny_llama_dir)
    names = select_trainable_parameters(model, ["model.layers.0.*", r"re:layers\.2\.mlp\."], tiny_llama_dir)

    assert any(name.startswith("model.layers.0.self_attn.") for name in names)
    assert any(name.startswith("model.layers.2.mlp.") for name in names)
    assert not any(name.startswith("model.layers.2.self_attn.") for name in names)


def test_select_tied_weight_counted_once(tiny_llama_dir: Path) -> None:
    model = load_tiny_model(tiny_llama_dir)
    names = select_trainable_parameters(model, ["lm_head.weight"], tiny_llama_dir)

    assert names == ["model.embed_tokens.weight"]
    assert model.get_input_embeddings().weight.requires_grad


def test_select_unmatched_pattern_raises(tiny_llama_dir: Path) -> None:
    model = load_tiny_model(tiny_llama_dir)

    with pytest.raises(TrainingError, match="matches no parameter"):
        select_trainable_parameters(model, ["model.decoder.*"], tiny_llama_dir)


def test_build_optimizer_holds_only_trainable_parameters(injected_llama_dir: Path) -> None:
    model = load_tiny_model(injected_llama_dir)
    select_trainable_parameters(model, ["new"], injected_llama_dir)
    optimizer = build_optimizer(model, TrainConfig(checkpoint=injected_llama_dir, data=[TRAIN_TEXT], out=Path("unused")))

    optimized = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    trainable = {id(parameter) for parameter in model.parameters() if parameter.requires_grad}
    assert optimized == trainable


def test_warmup_cosine_schedule_shape() -> None:
    schedule = WarmupCosineSchedule(warmup_steps=4, total_steps=14, min_ratio=0.1)

    assert schedule(0) == pytest.approx(0.2)
    assert schedule(3) == pytest.approx(0.8)
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(9) == pytest.approx(0.55)
    assert schedule(14) == pytest.approx(0.1)


def test_rng_state_roundtrip_through_weights_only_load(tmp_path: Path) -> None:
    import random

    import numpy as np

    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.random_sample(), torch.rand(1).item())

    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.random_sample(), torch.rand(1).item()) == expected


def test_choose_device_prefers_cuda_with_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)

    device = choose_device("auto", local_rank=1)
    assert device == torch.device("cuda", 1)
    assert choose_autocast_dtype(device, "auto") == torch.bfloat16


def test_choose_device_cpu_uses_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    device = choose_device("auto")
    assert device == torch.device("cpu")
    assert choose_autocast_dtype(device, "auto") is None


# ---------------------------------------------------------------- training runs


def test_train_new_keeps_original_layers_bitwise(injected_llama_dir: Path, tmp_path: Path) -> None:
    result = train(TrainConfig(checkpoint=injected_llama_dir, data=[TRAIN_TEXT], out=tmp_path / "run", train=["new"], **TINY_RUN))

    before = load_file(injected_llama_dir / "model.safetensors")
    after = load_file(result.final_dir / "model.safetensors")
    assert sorted(after) == sorted(before)

    new_prefixes = tuple(f"model.layers.{index}." for index in NEW_LAYERS)
    for name, tensor in before.items():
        if name.startswith(new_prefixes):
            assert not torch.equal(after[name], tensor), f"injected tensor {name} did not change"
        else:
            assert torch.equal(after[name], tensor), f"frozen tensor {name} changed"


def test_train_new_copies_manifest_to_final(injected_llama_dir: Path, tmp_path: Path) -> None:
    result = train(
        TrainConfig(checkpoint=injected_llama_dir, data=[TRAIN_TEXT], out=tmp_path / "run", train=["new"], **{**TINY_RUN, "steps": 1})
    )

    copied = json.loads((result.final_dir / "surgeon.json").read_text(encoding="utf-8"))
    source = json.loads((injected_llama_dir / "surgeon.json").read_text(encoding="utf-8"))
    assert copied.pop("trained")["from"] == str(injected_llama_dir)
    assert copied == source


def test_train_new_with_gradient_checkpointing_and_bf16(injected_llama_dir: Path, tmp_path: Path) -> None:
    # Non-reentrant checkpointing must still reach the injected layers although the frozen embeddings need no gradient.
    config = TrainConfig(
        checkpoint=injected_llama_dir,
        data=[TRAIN_TEXT],
        out=tmp_path / "run",
        train=["new"],
        gradient_checkpointing=True,
        precision="bf16",
        **{**TINY_RUN, "steps": 2},
    )
    result = train(config)

    before = load_file(injected_llama_dir / "model.safetensors")
    after = load_file(result.final_dir / "model.safetensors")
    assert not torch.equal(after["model.layers.1.mlp.up_proj.weight"], before["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_train_new_on_each_architecture(architecture: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    checkpoint = build_tiny(architecture, tmp_path / architecture, vocab_size=512)
    for tokenizer_file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_llama_dir / tokenizer_file, checkpoint / tokenizer_file)
    layers = [{"index": index, "new": index == 2} for index in range(6)]
    (checkpoint / "surgeon.json").write_text(json.dumps({"layers": layers}), encoding="utf-8")

    result = train(TrainConfig(checkpoint=checkpoint, data=[TRAIN_TEXT], out=tmp_path / "run", train=["new"], **{**TINY_RUN, "steps": 2}))

    before = load_file(checkpoint / "model.safetensors")
    after = load_file(result.final_dir / "model.safetensors")
    changed = sorted(name for name in before if not torch.equal(after[name], before[name]))
    assert changed
    assert all(name.startswith("model.layers.2.") for name in changed), changed


def test_train_final_loads_with_transformers(uninterrupted_run: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(uninterrupted_run / "final")
    tokenizer = transformers.AutoTokenizer.from_pretrained(uninterrupted_run / "final")

    assert model.config.num_hidden_layers == 4
    assert len(tokenizer) == model.config.vocab_size


def test_train_writes_metrics_per_step(uninterrupted_run: Path) -> None:
    records = load_metrics(uninterrupted_run)
    step_records = [record for record in records if "loss" in record]

    assert [record["step"] for record in step_records] == [1, 2, 3, 4, 5, 6]
    assert set(step_records[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "elapsed"}
    assert [record["step"] for record in records if "eval_loss" in record] == [0, 3, 6]
    assert step_records[-1]["tokens"] == 6 * 4 * 64


def test_train_lowers_held_out_loss(uninterrupted_run: Path) -> None:
    eval_losses = [record["eval_loss"] for record in load_metrics(uninterrupted_run) if "eval_loss" in record]

    assert eval_losses[-1] < eval_losses[0]


def test_train_checkpoint_holds_training_state(uninterrupted_run: Path) -> None:
    checkpoint = uninterrupted_run / "checkpoint-6"
    names = {path.name for path in checkpoint.iterdir()}

    assert {"config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.pt", "rng_state_0.pt"} <= names
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=True)["step"] == 6


def test_train_resume_matches_uninterrupted(tiny_llama_dir: Path, uninterrupted_run: Path, tmp_path: Path) -> None:
    # Tolerance: none. One CPU process replays the same float operations, so a resume must be bitwise exact.
    out = tmp_path / "resumed"
    base = {"checkpoint": tiny_llama_dir, "data": [TRAIN_TEXT], "eval_data": [HELD_OUT_TEXT], "eval_every": 3, "out": out, **TINY_RUN}
    stopped = train(TrainConfig(**base, stop_after=3))
    assert stopped.final_dir is None

    resumed = train(TrainConfig(**base, resume=True))

    expected_losses = [record.get("loss") for record in load_metrics(uninterrupted_run)]
    assert [record.get("loss") for record in load_metrics(out)] == expected_losses
    expected = load_file(uninterrupted_run / "final" / "model.safetensors")
    actual = load_file(resumed.final_dir / "model.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_train_resume_with_changed_lr_raises(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base = {"checkpoint": tiny_llama_dir, "data": [TRAIN_TEXT], "out": tmp_path / "run", **TINY_RUN}
    train(TrainConfig(**base, stop_after=1))

    with pytest.raises(TrainingError, match="differs"):
        train(TrainConfig(**{**base, "lr": 5e-4}, resume=True))


def test_train_existing_run_without_resume_raises(uninterrupted_run: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(TrainingError, match="already contains a run"):
        train(TrainConfig(checkpoint=tiny_llama_dir, data=[TRAIN_TEXT], out=uninterrupted_run, **TINY_RUN))


def test_train_ddp_two_processes_match_one(tiny_llama_dir: Path, uninterrupted_run: Path, tmp_path: Path) -> None:
    # Tolerance: 1e-5 absolute on weights and losses. Averaging two half-batch gradients rounds differently
    # from one full-batch mean; the observed difference after 6 steps is about 1e-7.
    out = tmp_path / "ddp"
    run_torchrun(tmp_path, tiny_run_arguments(tiny_llama_dir, out, batch_size=2))

    expected = load_file(uninterrupted_run / "final" / "model.safetensors")
    actual = load_file(out / "final" / "model.safetensors")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-5, msg=name)

    expected_losses = [record["loss"] for record in load_metrics(uninterrupted_run) if "loss" in record]
    actual_losses = [record["loss"] for record in load_metrics(out) if "loss" in record]
    assert actual_losses == pytest.approx(expected_losses, rel=0, abs=1e-5)


def test_train_fsdp_two_processes_saves_loadable_checkpoint(tiny_llama_dir: Path, uninterrupted_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdp"
    run_torchrun(tmp_path, [*tiny_run_arguments(tiny_llama_dir, out, batch_size=2), "--fsdp", "--save-every", "3"])

    model = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.num_hidden_layers == 4

    # Tolerance as in the DDP test: 1e-5 absolute against the one-process run.
    expected = load_file(uninterrupted_run / "final" / "model.safetensors")
    actual = load_file(out / "final" / "model.safetensors")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-5, msg=name)

    # The FSDP checkpoint is an unsharded, name-keyed state, so one process can resume it.
    (out / "final").rename(out / "final-fsdp")
    for later in ("checkpoint-6",):
        import shutil

        shutil.rmtree(out / later)
    resumed = train(
        TrainConfig(
            checkpoint=tiny_llama_dir, data=[TRAIN_TEXT], eval_data=[HELD_OUT_TEXT], eval_every=3, out=out, resume=True, **TINY_RUN
        )
    )
    resumed_weights = load_file(resumed.final_dir / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-5, msg=name)


# ---------------------------------------------------------------- evaluation


def test_evaluate_model_matches_transformers_loss(tiny_llama_dir: Path) -> None:
    model = load_tiny_model(tiny_llama_dir)
    window = torch.randint(0, model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(0))

    result = evaluate_model(model, [window], batch_size=1, device=torch.device("cpu"))
    with torch.no_grad():
        expected = model(input_ids=window[None], labels=window[None]).loss.item()
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.tokens == 31


def test_eval_command_json(tiny_llama_dir: Path) -> None:
    arguments = [str(tiny_llama_dir), "--data", str(HELD_OUT_TEXT), "--seq-len", "64", "--max-windows", "5", "--json"]
    outcome = CliRunner().invoke(eval_command, arguments)

    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.stdout)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert report["tokens"] == 5 * 63
    assert report["tokens_per_second"] > 0


def test_eval_command_jsonl_input(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "held_out.jsonl"
    path.write_text(json.dumps({"text": HELD_OUT_TEXT.read_text(encoding="utf-8")[:2000]}) + "\n", encoding="utf-8")
    outcome = CliRunner().invoke(eval_command, [str(tiny_llama_dir), "--data", str(path), "--seq-len", "64"])

    assert outcome.exit_code == 0, outcome.output
    assert "perplexity" in outcome.output


# ---------------------------------------------------------------- commands and plot


def test_train_command_new_without_manifest_fails(tiny_llama_dir: Path, tmp_path: Path) -> None:
    arguments = [str(tiny_llama_dir), "--data", str(TRAIN_TEXT), "--out", str(tmp_path / "run"), "--train", "new", "--seq-len", "64"]
    outcome = CliRunner().invoke(train_command, arguments)

    assert outcome.exit_code == 1
    assert "surgeon.json" in outcome.output


def test_plot_command_writes_png(uninterrupted_run: Path, tmp_path: Path) -> None:
    png = tmp_path / "curves.png"
    outcome = CliRunner().invoke(plot_command, [str(uninterrupted_run), str(uninterrupted_run), "--out", str(png)])

    assert outcome.exit_code == 0, outcome.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_labels_are_folder_names(tmp_path: Path) -> None:
    labels = run_labels([tmp_path / "a" / "base", tmp_path / "b" / "base", tmp_path / "tli"])

    assert labels == ["a/base", "b/base", "tli"]


def test_cli_import_does_not_import_torch() -> None:
    code = "import sys, surgeon.cli; sys.exit(1 if {'torch', 'transformers', 'matplotlib'} & set(sys.modules) else 0)"
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)

    assert completed.returncode == 0, completed.stderr


def test_cli_registers_train_eval_plot() -> None:
    from surgeon.cli import main

    assert {"train", "eval", "plot"} <= set(main.commands)


def test_eval_command_without_extra_names_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for module_name in [name for name in sys.modules if name.startswith("surgeon.train.") and name != "surgeon.train.commands"]:
        monkeypatch.delitem(sys.modules, module_name)
    monkeypatch.setitem(sys.modules, "torch", None)
    text = tmp_path / "text.txt"
    text.write_text("text", encoding="utf-8")

    outcome = CliRunner().invoke(eval_command, [str(tmp_path), "--data", str(text)])
    assert outcome.exit_code == 1
    assert "pip install 'surgeon[train]'" in outcome.output
