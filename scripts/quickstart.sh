#!/usr/bin/env bash
# Install surgeon, build the real SmolLM2-135M-Instruct checkpoint offline, run TLI K=4 on it,
# and check the result with transformers: 37 layers, no missing keys, equal logits.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

bash scripts/setup.sh
model=$(.venv/bin/python -c "from tests.models import build_smollm2; print(build_smollm2())")
rm -rf out/smollm2-tli-k4
.venv/bin/surgeon plan recipes/tli_k4.yaml "$model" | tail -4
.venv/bin/surgeon apply recipes/tli_k4.yaml "$model" out/smollm2-tli-k4
.venv/bin/python scripts/compare_logits.py "$model" out/smollm2-tli-k4
