"""Measure mean next-token loss of checkpoints on the start of a text file.

The first `--tokens` tokens of the text (tokenized by each checkpoint's own
tokenizer) run through the model in one float32 forward pass on the CPU; the
loss is the mean cross-entropy over the tokens after the first, in nats.
Upcycling with identical experts should leave the loss unchanged.

Run: python benchmarks/moe_loss.py ~/.cache/surgeon-tests/smollm2-135m-instruct out/ \\
         --text /usr/share/common-licenses/GPL-3 --tokens 1024
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def mean_token_loss(folder: str | Path, text: str, tokens: int = 1024) -> tuple[float, int]:
    """Return (mean next-token loss in nats, token count) of the checkpoint on the first `tokens` tokens of `text`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    token_ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
    with torch.no_grad():
        loss = model(token_ids, labels=token_ids).loss
    return loss.item(), token_ids.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders to measure")
    parser.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"), help="UTF-8 text file")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens from the start of the text")
    args = parser.parse_args()

    text = args.text.read_text(encoding="utf-8")
    print("| checkpoint | tokens | mean loss (nats) |")
    print("| --- | --- | --- |")
    for folder in args.checkpoints:
        loss, count = mean_token_loss(folder, text, args.tokens)
        print(f"| {folder} | {count} | {loss:.4f} |", flush=True)


if __name__ == "__main__":
    main()
