"""Measure mean token loss of SmolLM2 and its grown variants on fixed windows of real text.

Each row runs `surgeon apply` on the base model into a temporary folder and
evaluates the result with transformers on the same token windows, then the
script prints a markdown table. Add a row by appending a (label, recipe) pair
to ROWS; a recipe of None is the base model itself.

Usage: PYTHONPATH=. python benchmarks/loss_table.py [--tokens 4096] [--window 512]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT_FILE = Path("/usr/share/common-licenses/GPL-3")
ROWS: list[tuple[str, Path | None]] = [
    ("base SmolLM2-135M-Instruct", None),
    ("TLI K=4 (tli_k4.yaml)", REPO_ROOT / "recipes" / "tli_k4.yaml"),
    ("DUS m=8 (dus_solar.yaml)", REPO_ROOT / "recipes" / "dus_solar.yaml"),
    ("MoE 4 experts, top-2, zero router (moe_4x_top2.yaml)", REPO_ROOT / "recipes" / "moe_4x_top2.yaml"),
]


def token_windows(tokenizer, tokens: int, window: int) -> list[list[int]]:
    """Return the first `tokens` tokens of the text split into windows of `window` tokens."""
    ids = tokenizer(TEXT_FILE.read_text(encoding="utf-8"))["input_ids"][:tokens]
    return [ids[start : start + window] for start in range(0, len(ids) - window + 1, window)]


def mean_token_loss(folder: Path, windows: list[list[int]]) -> tuple[float, int]:
    """Return the mean next-token cross-entropy over all windows, in nats, and the layer count."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            input_ids = torch.tensor([window])
            loss = model(input_ids, labels=input_ids).loss.item()
            total += loss * (len(window) - 1)
            count += len(window) - 1
    return total / count, model.config.num_hidden_layers


def build(recipe: Path, base: Path, output: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "surgeon", "apply", str(recipe), str(base), str(output), "--quiet"], check=True, env=environment)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="number of text tokens to evaluate")
    parser.add_argument("--window", type=int, default=512, help="tokens per evaluation window")
    arguments = parser.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(REPO_ROOT))
    from transformers import AutoTokenizer

    from tests.models import build_smollm2

    base = build_smollm2()
    windows = token_windows(AutoTokenizer.from_pretrained(base), arguments.tokens, arguments.window)
    evaluated = sum(len(window) - 1 for window in windows)

    print(f"Mean token loss on the first {len(windows) * arguments.window} tokens of {TEXT_FILE} "
          f"({len(windows)} windows of {arguments.window}, {evaluated} predicted tokens), float32, CPU.\n")
    print("| model | layers | mean loss (nats) | perplexity | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as scratch:
        for index, (label, recipe) in enumerate(ROWS):
            started = time.perf_counter()
            folder = base
            if recipe is not None:
                folder = Path(scratch) / f"row{index}"
                build(recipe, base, folder)
            loss, layers = mean_token_loss(folder, windows)
            print(f"| {label} | {layers} | {loss:.6f} | {math.exp(loss):.3f} | {time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
