"""The `surgeon` command line: plan, inspect, apply, recipes and its one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checks import folder_digest

REPO = Path(__file__).resolve().parents[1]


def run_surgeon(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "surgeon", *args], capture_output=True, text=True, cwd=cwd, env=environment)


def test_plan_prints_layer_map_and_writes_nothing(smollm2_dir, tmp_path):
    before = folder_digest(smollm2_dir)
    result = run_surgeon("plan", "recipes/tli_k4.yaml", str(smollm2_dir))
    assert result.returncode == 0, result.stderr
    assert "output: 37 layers" in result.stdout
    assert result.stdout.count("NEW") == 7
    assert "134,515,008 parameters" in result.stdout
    assert folder_digest(smollm2_dir) == before


def test_inspect_prints_layers_and_parameters(smollm2_dir):
    result = run_surgeon("inspect", str(smollm2_dir))
    assert result.returncode == 0, result.stderr
    assert "layers: 30" in result.stdout
    assert "parameters: 134,515,008" in result.stdout
    assert "self_attn.o_proj.weight  F32 [576, 576]" in result.stdout


def test_recipes_lists_shipped_recipes():
    result = run_surgeon("recipes")
    assert result.returncode == 0, result.stderr
    assert "tli_k4" in result.stdout
    assert "tli_k8" in result.stdout


def test_apply_leaves_input_untouched(tiny_models, tmp_path):
    source = tmp_path / "input"
    shutil.copytree(tiny_models["llama"], source)
    before = folder_digest(source)
    mtimes = {path.name: path.stat().st_mtime_ns for path in source.iterdir()}
    result = run_surgeon("apply", "recipes/tli_k4.yaml", str(source), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert folder_digest(source) == before
    assert {path.name: path.stat().st_mtime_ns for path in source.iterdir()} == mtimes


def test_apply_rejects_non_empty_output_without_force(tiny_models, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    result = run_surgeon("apply", "recipes/tli_k4.yaml", str(tiny_models["llama"]), str(output))
    assert result.returncode == 1
    assert "not empty" in result.stderr
    assert "--force" in result.stderr
    assert (output / "keep.txt").read_text() == "user data"


def test_apply_force_replaces_output(tiny_models, tmp_path):
    output = tmp_path / "out"
    first = run_surgeon("apply", "recipes/tli_k4.yaml", str(tiny_models["llama"]), str(output), "--quiet")
    assert first.returncode == 0, first.stderr
    (output / "stale.txt").write_text("old")
    result = run_surgeon("apply", "recipes/tli_k4.yaml", str(tiny_models["llama"]), str(output), "--force", "--quiet")
    assert result.returncode == 0, result.stderr
    assert not (output / "stale.txt").exists()
    assert json.loads((output / "config.json").read_text())["num_hidden_layers"] == 7


def test_apply_leaves_no_partial_folder(tiny_models, tmp_path):
    result = run_surgeon("apply", "recipes/tli_k4.yaml", str(tiny_models["llama"]), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_apply_output_files_take_input_permissions(tiny_models, tmp_path):
    source = tmp_path / "input"
    shutil.copytree(tiny_models["llama"], source)
    os.chmod(source / "model.safetensors", 0o600)
    os.chmod(source / "config.json", 0o644)
    result = run_surgeon("apply", "recipes/tli_k4.yaml", str(source), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "out").iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_apply_bad_recipe_prints_one_line(tiny_models, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("version: 1\nsteps:\n  - tli:\n      every: 4\n      copy_from: nearest\n")
    result = run_surgeon("apply", str(recipe), str(tiny_models["llama"]), str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert f"{recipe}:5" in result.stderr
    assert "previous, next, mean" in result.stderr
    assert not (tmp_path / "out").exists()


def test_apply_debug_shows_traceback(tiny_models, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("version: 1\nsteps:\n  - tli:\n      every: 0\n")
    result = run_surgeon("--debug", "apply", str(recipe), str(tiny_models["llama"]), str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_apply_unknown_architecture_lists_supported(tiny_models, tmp_path):
    source = tmp_path / "input"
    shutil.copytree(tiny_models["llama"], source)
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "falcon"
    (source / "config.json").write_text(json.dumps(config))
    result = run_surgeon("apply", "recipes/tli_k4.yaml", str(source), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "unsupported model_type 'falcon'" in result.stderr
    assert "qwen3" in result.stderr
    assert "layer_prefix" in result.stderr


def test_apply_custom_layer_prefix_runs_unknown_architecture(tiny_models, tmp_path):
    source = tmp_path / "input"
    shutil.copytree(tiny_models["llama"], source)
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "my_llama"
    (source / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "custom.yaml"
    recipe.write_text("version: 1\narchitecture:\n  layer_prefix: 'model.layers.{}.'\nsteps:\n  - tli:\n      every: 3\n")
    result = run_surgeon("apply", str(recipe), str(source), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 8


def test_apply_writes_manifest_and_model_card(tiny_models, tmp_path):
    result = run_surgeon("apply", "recipes/tli_k4.yaml", str(tiny_models["llama"]), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "surgeon.json").read_text())
    card = (tmp_path / "out" / "README.md").read_text()
    assert manifest["recipe"]["text"] == (REPO / "recipes" / "tli_k4.yaml").read_text()
    assert [layer["new"] for layer in manifest["layers"]].count(True) == 1
    assert len(manifest["inputs"]["input"]["fingerprint"]) == 64
    assert card.startswith("---\n")
    assert "every: 4" in card


@pytest.mark.parametrize(
    ("recipe_text", "fragment"),
    [
        ("version: 1\nsteps:\n  - tli:\n      every: 4\n      zero: [self_attn.out_proj]\n", "match no tensor"),
        ("version: 1\nsteps:\n  - dance: {}\n", "unknown step kind 'dance'"),
        ("version: 1\nsteps: []\n", "steps"),
        ("steps:\n  - tli: {every: 4}\n", "version"),
        ("version: 1\ndtype: float8\nsteps:\n  - tli: {every: 4}\n", "unknown dtype"),
        ("version: 1\nsteps:\n  - tli: {every: 4, remainder: drop}\n", "skip, insert"),
        ("version: 1\nsteps:\n  - tli: {every: -1}\n", "greater than 0"),
        ("version: 1\nsteps:\n  - tli: {every: 4\n", "invalid YAML"),
        ("- 1\n- 2\n", "YAML mapping"),
        ("version: 1\nsteps: " + "[" * 100_000 + "]" * 100_000 + "\n", "too deeply"),
    ],
)
def test_apply_invalid_recipe_is_rejected(recipe_text, fragment, tiny_models, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
    result = run_surgeon("apply", str(recipe), str(tiny_models["llama"]), str(tmp_path / "out"))
    assert result.returncode == 1
    assert fragment in result.stderr
    assert not (tmp_path / "out").exists()


def test_validate_checks_recipe_against_checkpoint(smollm2_dir):
    result = run_surgeon("validate", "recipes/tli_k8.yaml", str(smollm2_dir))
    assert result.returncode == 0, result.stderr
    assert "output has 33 layers" in result.stdout


def test_apply_force_rejects_folder_surgeon_did_not_write(tiny_models, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("user data")
    result = run_surgeon("apply", "recipes/tli_k4.yaml", str(tiny_models["llama"]), str(output), "--force")
    assert result.returncode == 1
    assert "surgeon did not write it" in result.stderr
    assert (output / "notes.txt").read_text() == "user data"


def test_apply_creates_missing_output_parents(tiny_models, tmp_path):
    output = tmp_path / "new" / "folders" / "out"
    result = run_surgeon("apply", "recipes/tli_k4.yaml", str(tiny_models["llama"]), str(output), "--quiet")
    assert result.returncode == 0, result.stderr
    assert (output / "model.safetensors").is_file()


def test_apply_skips_side_file_linking_outside_input(tiny_models, tmp_path):
    source = tmp_path / "input"
    shutil.copytree(tiny_models["llama"], source)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    (source / "tokenizer_extra.txt").symlink_to(secret)
    result = run_surgeon("apply", "recipes/tli_k4.yaml", str(source), str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out" / "tokenizer_extra.txt").exists()


def test_plan_accepts_shipped_recipe_name(smollm2_dir):
    result = run_surgeon("plan", "tli_k4", str(smollm2_dir), cwd=Path("/"))
    assert result.returncode == 0, result.stderr
    assert "output: 37 layers" in result.stdout


def test_apply_rejects_second_concurrent_run(tiny_models, tmp_path):
    import fcntl

    output = tmp_path / "out"
    partial = tmp_path / ".out.surgeon-partial"
    partial.mkdir()
    descriptor = os.open(partial, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    try:
        result = run_surgeon("apply", "recipes/tli_k4.yaml", str(tiny_models["llama"]), str(output), "--resume")
    finally:
        os.close(descriptor)
    assert result.returncode == 1
    assert "another surgeon run is writing" in result.stderr
    assert partial.is_dir()


def test_apply_overflowing_scale_names_tensor(tiny_models, tmp_path):
    recipe = tmp_path / "overflow.yaml"
    recipe.write_text('version: 1\ndtype: float16\nsteps:\n  - tli: {every: 2, scale: {"mlp.gate_proj": 1.0e8}}\n')
    result = run_surgeon("apply", str(recipe), str(tiny_models["llama"]), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "F16 cannot hold" in result.stderr
    assert "mlp.gate_proj.weight" in result.stderr
    assert not (tmp_path / "out").exists()


def test_apply_unused_input_rejected(tiny_models, tmp_path):
    recipe = tmp_path / "slices.yaml"
    recipe.write_text(
        f"version: 1\nmodels:\n  a: {tiny_models['llama']}\nslices:\n  - model: a\n    layers: [0, 6]\n"
    )
    result = run_surgeon("apply", str(recipe), str(tiny_models["qwen2"]), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "not used by this recipe" in result.stderr


def test_train_rejects_run_folder_inside_checkpoint(tiny_models):
    result = run_surgeon("train", str(tiny_models["llama"]), "--data", "/usr/share/common-licenses/GPL-3", "--out", str(tiny_models["llama"] / "run"))
    assert result.returncode != 0
    assert "overlaps the checkpoint folder" in result.stderr
    assert not (tiny_models["llama"] / "run").exists()


def test_apply_resume_on_finished_output_says_complete(tiny_models, tmp_path):
    output = tmp_path / "out"
    assert run_surgeon("apply", "tli_k4", str(tiny_models["llama"]), str(output), "--quiet").returncode == 0
    result = run_surgeon("apply", "tli_k4", str(tiny_models["llama"]), str(output), "--resume")
    assert result.returncode == 1
    assert "already complete" in result.stderr


def test_eval_error_is_one_line_without_traceback(tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    result = run_surgeon("eval", str(tmp_path), "--data", str(binary))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


def test_ctrl_c_outside_writing_prints_one_line():
    import click
    from click.testing import CliRunner

    from surgeon.cli_errors import reports_errors

    @click.command()
    @reports_errors
    def planning() -> None:
        raise KeyboardInterrupt

    outcome = CliRunner().invoke(planning, [])

    assert outcome.exit_code == 130
    assert outcome.output.strip().splitlines() == [
        "error: interrupted by Ctrl-C; no output was finished. "
        "Fix: run the command again (a `surgeon train` run continues from its last checkpoint with --resume)"
    ]


@pytest.mark.parametrize(
    ("output", "private", "expected"),
    [
        ("out", False, "surgeon push out me/x"),
        ("my out", True, "surgeon push --private 'my out' me/x"),
        ("-out", False, "surgeon push -- -out me/x"),
    ],
)
def test_push_command_line_quotes_output(output, private, expected):
    from surgeon.cli import push_command_line

    assert push_command_line(output, "me/x", private) == expected
