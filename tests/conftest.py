"""Shared fixtures: the real SmolLM2 checkpoint, tiny checkpoints and real text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.models import TEXT_FILE, TINY_ARCHITECTURES, build_smollm2, build_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint (float32 safetensors, 30 layers, tied embeddings)."""
    return build_smollm2()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint per supported architecture, keyed by TINY_ARCHITECTURES name."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny(name, root / name) for name in TINY_ARCHITECTURES}


@pytest.fixture(scope="session")
def english_text() -> str:
    return TEXT_FILE.read_text(encoding="utf-8")
