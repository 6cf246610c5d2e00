"""Load two checkpoints with transformers and print their layer counts, key mismatches and logit difference.

Run: python scripts/compare_logits.py INPUT OUTPUT [--text FILE] [--tokens N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description="Compare the logits of two checkpoints on real text.")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/Apache-2.0"))
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.input)
    ids = tokenizer(args.text.read_text(), return_tensors="pt").input_ids[:, : args.tokens]
    base = AutoModelForCausalLM.from_pretrained(args.input, dtype=torch.float32).eval()
    grown, info = AutoModelForCausalLM.from_pretrained(args.output, dtype=torch.float32, output_loading_info=True)
    grown.eval()
    with torch.no_grad():
        difference = (base(ids).logits - grown(ids).logits).abs().max().item()

    print(f"layers: {base.config.num_hidden_layers} -> {grown.config.num_hidden_layers}")
    print(f"missing keys: {len(info['missing_keys'])}, unexpected keys: {len(info['unexpected_keys'])}")
    print(f"max |logit difference| over {ids.shape[1]} tokens of {args.text.name}: {difference:.3e}")


if __name__ == "__main__":
    main()
