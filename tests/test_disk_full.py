"""Full and read-only disks, on small tmpfs mounts the tests create: clear errors, no finished-looking output, resumable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from surgeon.writer import partial_folder
from tests.models import build_tiny

REPO = Path(__file__).parent.parent
RECIPE = REPO / "recipes" / "tli_k4.yaml"
SHARD_SIZE = "100KB"
# The tiny llama output is about 1.2 MB, so 256 KiB cannot hold it and 4 MiB can.
SMALL_DISK = "256k"
LARGE_DISK = "4m"


def run_surgeon(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "surgeon", *args], env=env, capture_output=True, text=True, timeout=120)


@contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs at `folder` for the block, or skip the test where mounting is not allowed."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


def needed_bytes(message: str) -> int:
    match = re.search(r"needs ([\d,]+) bytes", message)
    assert match, message
    return int(match.group(1).replace(",", ""))


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("disk") / "llama")


@pytest.fixture(scope="module")
def expected_output(model: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("expected") / "out"
    result = run_surgeon("apply", str(RECIPE), str(model), str(output), "--max-shard-size", SHARD_SIZE, "--quiet")
    assert result.returncode == 0, result.stderr
    return output


def test_free_space_check_rejects_early(model: Path, expected_output: Path, tmp_path: Path):
    with tmpfs(tmp_path / "disk", f"size={SMALL_DISK}") as disk:
        output = disk / "out"

        result = run_surgeon("apply", str(RECIPE), str(model), str(output), "--max-shard-size", SHARD_SIZE, "--quiet")

        output_size = sum(path.stat().st_size for path in expected_output.iterdir())
        assert result.returncode == 1
        assert "bytes are free" in result.stderr
        assert needed_bytes(result.stderr) == output_size
        assert "--no-space-check" in result.stderr
        assert "Traceback" not in result.stderr
        assert os.listdir(disk) == []


def test_disk_full_mid_write_resumes(model: Path, expected_output: Path, tmp_path: Path):
    with tmpfs(tmp_path / "disk", f"size={SMALL_DISK}") as disk:
        output = disk / "out"
        partial = partial_folder(output)
        args = ["apply", str(RECIPE), str(model), str(output), "--max-shard-size", SHARD_SIZE, "--quiet"]

        full = run_surgeon(*args, "--no-space-check")

        assert full.returncode == 1
        assert "disk full while writing" in full.stderr
        assert needed_bytes(full.stderr) > 0
        assert "rerun with --resume" in full.stderr
        assert "Traceback" not in full.stderr
        assert not output.exists()
        assert partial.is_dir()
        assert not list(partial.glob("*.tmp")), (sorted(path.name for path in partial.iterdir()), full.stderr)
        assert list(partial.glob("*.safetensors"))

        remount(disk, f"size={LARGE_DISK}")
        resumed = run_surgeon(*args, "--resume")

        assert resumed.returncode == 0, resumed.stderr
        assert not partial.exists()
        assert file_bytes(output) == file_bytes(expected_output)


def test_read_only_output_parent_one_line_error(model: Path, tmp_path: Path):
    with tmpfs(tmp_path / "disk", "size=1m,ro") as disk:
        result = run_surgeon("apply", str(RECIPE), str(model), str(disk / "out"), "--quiet")

        assert result.returncode == 1
        assert "cannot create the partial output folder: Read-only file system" in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_missing_output_parent_is_created(model: Path, tmp_path: Path):
    result = run_surgeon("apply", str(RECIPE), str(model), str(tmp_path / "no" / "such" / "out"), "--quiet")

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "no" / "such" / "out" / "surgeon.json").is_file()

