"""Train a base checkpoint and its surgery outputs briefly and compare their loss curves.

Meant for SmolLM2-135M and its TLI K=4 and DUS m=8 outputs, but any causal LM
folders with a tokenizer work (the tests' tiny checkpoints too). Each run trains
the same number of steps on licence texts from /usr/share/common-licenses and
evaluates on other licence texts held out from training. Writes:

- OUT/RUN_NAME/: the run folder of each checkpoint (metrics.jsonl, final/),
- OUT/train_curves.md: a table of loss at step 0 and at the end of each run,
- OUT/train_curves.png: the loss curves of all runs in one plot.

Run: python benchmarks/train_curves.py BASE TLI DUS --names base,tli-k4,dus-m8 --out /tmp/train-curves
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
TRAIN_FILES = ("Apache-2.0", "GPL-3")
HELD_OUT_FILES = ("MPL-2.0", "LGPL-3")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders, such as BASE TLI DUS")
    parser.add_argument("--names", default=None, help="comma-separated run names (default: the folder names)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, the table and the PNG")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--train", default="all", help="what trains in every run: all, new or a pattern, as in surgeon train --train")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def run_names(arguments: argparse.Namespace) -> list[str]:
    if arguments.names:
        names = arguments.names.split(",")
        if len(names) != len(arguments.checkpoints):
            raise SystemExit(f"--names has {len(names)} names for {len(arguments.checkpoints)} checkpoints")
    else:
        names = [checkpoint.name for checkpoint in arguments.checkpoints]

    if len(set(names)) != len(names):
        names = [f"{index}-{name}" for index, name in enumerate(names)]
    return names


def summarise_run(name: str, checkpoint: Path, run_folder: Path, seconds: float, trainable: int) -> dict[str, object]:
    """Collect one table row from a finished run's metrics.jsonl and config."""
    from surgeon.train.trainer import iter_metrics

    records = list(iter_metrics(run_folder))
    train_losses = [record["loss"] for record in records if "loss" in record]
    eval_losses = [record["eval_loss"] for record in records if "eval_loss" in record]
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    return {
        "run": name,
        "layers": config.get("num_hidden_layers"),
        "trainable_parameters": trainable,
        "eval_loss_step_0": eval_losses[0] if eval_losses else None,
        "eval_loss_end": eval_losses[-1] if eval_losses else None,
        "train_loss_first_step": train_losses[0],
        "train_loss_last_step": train_losses[-1],
        "seconds": seconds,
    }


def markdown_table(rows: list[dict[str, object]], arguments: argparse.Namespace) -> str:
    import torch

    def number(value: object) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        "# Loss before and after a short training run",
        "",
        f"{arguments.steps} steps of {arguments.batch_size} windows × {arguments.seq_len} tokens, "
        f"lr {arguments.lr:g} (warmup {arguments.warmup_steps}, cosine to 10 %), --train {arguments.train}, seed {arguments.seed}.",
        f"Training text: {', '.join(TRAIN_FILES)}; held-out text: {', '.join(HELD_OUT_FILES)} (from {LICENSES}).",
        f"Measured with torch {torch.__version__} on {platform.machine()} with {os.cpu_count()} CPU threads"
        f"{' and CUDA' if torch.cuda.is_available() else ''}.",
        "Step-0 eval loss is measured before the first update; loss is mean cross-entropy in nats per token.",
        "",
        "| run | layers | trainable parameters | held-out loss, step 0 | held-out loss, end | train loss, step 1 | train loss, last step | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['layers']} | {row['trainable_parameters']:,} | {number(row['eval_loss_step_0'])} "
            f"| {number(row['eval_loss_end'])} | {number(row['train_loss_first_step'])} | {number(row['train_loss_last_step'])} "
            f"| {row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    arguments = parse_arguments()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from surgeon.train.plot import plot_runs
    from surgeon.train.trainer import TrainConfig, train

    names = run_names(arguments)
    arguments.out.mkdir(parents=True, exist_ok=True)
    rows = []
    run_folders = []
    for name, checkpoint in zip(names, arguments.checkpoints):
        run_folder = arguments.out / name
        shutil.rmtree(run_folder, ignore_errors=True)
        config = TrainConfig(
            checkpoint=checkpoint,
            data=[LICENSES / file_name for file_name in TRAIN_FILES],
            eval_data=[LICENSES / file_name for file_name in HELD_OUT_FILES],
            out=run_folder,
            train=[arguments.train],
            steps=arguments.steps,
            seq_len=arguments.seq_len,
            batch_size=arguments.batch_size,
            lr=arguments.lr,
            warmup_steps=arguments.warmup_steps,
            eval_every=arguments.eval_every,
            seed=arguments.seed,
        )

        started = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - started
        rows.append(summarise_run(name, checkpoint, run_folder, seconds, result.trainable_parameters))
        run_folders.append(run_folder)

    table_path = arguments.out / "train_curves.md"
    table_path.write_text(markdown_table(rows, arguments), encoding="utf-8")
    png_path = plot_runs(run_folders, arguments.out / "train_curves.png", title=f"{arguments.steps} training steps")
    print(table_path.read_text(encoding="utf-8"))
    print(f"wrote {table_path} and {png_path}")


if __name__ == "__main__":
    main()
