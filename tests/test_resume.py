"""Kill `surgeon apply` mid-write with a real signal, resume it, and compare with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgeon.writer import partial_folder
from surgeon.writer.output import JOURNAL_NAME, THROTTLE_ENV
from tests.models import build_tiny

REPO = Path(__file__).parent.parent
RECIPE = REPO / "recipes" / "tli_k4.yaml"
SHARD_SIZE = "100KB"
# Seconds slept after each tensor, so a run over ~66 tensors lasts about 2 s and a signal lands mid-shard.
THROTTLE_SECONDS = "0.03"


def surgeon_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "surgeon", *args]


def surgeon_env(throttle: str | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop(THROTTLE_ENV, None)
    if throttle:
        env[THROTTLE_ENV] = throttle
    return env


def run_surgeon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(surgeon_command(*args), env=surgeon_env(), capture_output=True, text=True, timeout=120)


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def finished_shards(partial: Path) -> list[str]:
    try:
        return json.loads((partial / JOURNAL_NAME).read_text())["finished"]
    except (FileNotFoundError, ValueError):
        return []


def wait_until_mid_shard(process: subprocess.Popen, partial: Path, finished: int) -> None:
    """Wait until the journal lists `finished` shards and the next shard's `.tmp` file exists."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"surgeon exited with {process.returncode} before it could be interrupted: {process.stderr.read()}")
        if len(finished_shards(partial)) >= finished and any(partial.glob("*.safetensors.tmp")):
            return
        time.sleep(0.005)
    pytest.fail("surgeon did not reach the middle of a shard within 60 s")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("resume") / "llama")


@pytest.fixture(scope="module")
def uninterrupted(model: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = run_surgeon("apply", str(RECIPE), str(model), str(output), "--max-shard-size", SHARD_SIZE, "--quiet")
    assert result.returncode == 0, result.stderr
    return output


def test_uninterrupted_run_has_many_shards(uninterrupted: Path):
    assert len(list(uninterrupted.glob("*.safetensors"))) >= 8


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_resume_after_signal_byte_identical(signal_number: int, model: Path, uninterrupted: Path, tmp_path: Path):
    output = tmp_path / "out"
    partial = partial_folder(output)
    apply_args = ["apply", str(RECIPE), str(model), str(output), "--max-shard-size", SHARD_SIZE, "--quiet"]
    process = subprocess.Popen(
        surgeon_command(*apply_args), env=surgeon_env(THROTTLE_SECONDS), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_until_mid_shard(process, partial, finished=2)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)

    assert not output.exists()
    assert partial.is_dir()
    assert len(finished_shards(partial)) >= 2
    assert len(finished_shards(partial)) < len(list(uninterrupted.glob("*.safetensors")))
    if signal_number == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 128 + signal_number
        assert "rerun the same command with --resume" in stderr
        assert "Traceback" not in stderr
        assert not list(partial.glob("*.tmp"))

    resumed = run_surgeon(*apply_args, "--resume")

    assert resumed.returncode == 0, resumed.stderr
    assert not partial.exists()
    assert file_bytes(output) == file_bytes(uninterrupted)


def test_partial_without_resume_rejected(model: Path, tmp_path: Path):
    output = tmp_path / "out"
    partial_folder(output).mkdir()

    result = run_surgeon("apply", str(RECIPE), str(model), str(output), "--quiet")

    assert result.returncode == 1
    assert "pass --resume to finish it" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_other_shard_size_rejected(model: Path, tmp_path: Path):
    output = tmp_path / "out"
    partial = partial_folder(output)
    args = ["apply", str(RECIPE), str(model), str(output), "--quiet"]
    process = subprocess.Popen(surgeon_command(*args, "--max-shard-size", SHARD_SIZE), env=surgeon_env(THROTTLE_SECONDS), stderr=subprocess.PIPE, text=True)
    wait_until_mid_shard(process, partial, finished=1)
    process.kill()
    process.communicate(timeout=60)

    result = run_surgeon(*args, "--max-shard-size", "200KB", "--resume")

    assert result.returncode == 1
    assert "written by a different recipe, input or shard size" in result.stderr
    assert not output.exists()


def test_verify_deep_uninterrupted_output(model: Path, uninterrupted: Path):
    result = run_surgeon("verify", str(uninterrupted), "--deep")

    assert result.returncode == 0, result.stderr
    assert "compared with the inputs" in result.stdout


def test_resume_rewrites_changed_finished_shard(tmp_path):
    """A finished shard altered before --resume is written again, so the output matches a clean run."""
    model = build_tiny("llama", tmp_path / "model")
    clean = tmp_path / "clean"
    assert run_surgeon("apply", str(RECIPE), str(model), str(clean), "--max-shard-size", "100KB", "--quiet").returncode == 0

    output = tmp_path / "out"
    partial = tmp_path / ".out.surgeon-partial"
    first = run_surgeon("apply", str(RECIPE), str(model), str(output), "--max-shard-size", "100KB", "--quiet")
    assert first.returncode == 0, first.stderr
    output.rename(partial)
    journal = {"plan": json.loads((partial / "surgeon.json").read_text())["output"]["plan_fingerprint"]}
    shard = sorted(partial.glob("model-*.safetensors"))[0]
    journal["finished"] = [shard.name]
    journal["stamps"] = {shard.name: [shard.stat().st_size, shard.stat().st_mtime_ns]}
    (partial / JOURNAL_NAME).write_text(json.dumps(journal))
    with open(shard, "r+b") as handle:
        handle.seek(-1000, os.SEEK_END)
        handle.write(b"\xff" * 1000)

    resumed = run_surgeon("apply", str(RECIPE), str(model), str(output), "--max-shard-size", "100KB", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert (output / shard.name).read_bytes() == (clean / shard.name).read_bytes()
