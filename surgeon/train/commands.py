"""Click commands `train`, `eval` and `plot`.

This module imports neither torch nor transformers nor matplotlib, so
`import surgeon.cli` works without the `train` extra. Each command imports what
it needs when it runs and turns a missing extra into a one-line error.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import click

from surgeon.cli_errors import reports_errors

INSTALL_HINT = "install with pip install 'surgeon[train]'"

existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)
existing_folder = click.Path(exists=True, file_okay=False, path_type=Path)


def _import_extra(module_name: str) -> Any:
    """Import a `surgeon.train` submodule, raising a click error that names the extra when torch or its friends are missing."""
    import importlib

    try:
        return importlib.import_module(f"surgeon.train.{module_name}")
    except ImportError as error:
        missing = getattr(error, "name", None) or str(error)
        raise click.ClickException(f"'surgeon {module_name}' needs {missing}, which is not installed: {INSTALL_HINT}") from error


def _configure_logging() -> None:
    """Log INFO to stderr on the main process and warnings only on the other `torchrun` ranks."""
    if logging.getLogger().handlers:
        return
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@click.command("train")
@click.argument("checkpoint", type=existing_folder)
@click.option("--data", "data", multiple=True, required=True, type=existing_file, help="Training text or JSONL file (field `text`); repeat for several.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder for checkpoint-STEP/, final/ and metrics.jsonl.")
@click.option("--eval-data", multiple=True, type=existing_file, help="Held-out text or JSONL file; repeat for several.")
@click.option("--eval-every", default=0, show_default=True, help="Evaluate on --eval-data every N steps (0: only at step 0 and the last step).")
@click.option("--eval-max-windows", type=int, default=None, help="Evaluate on only the first N windows of --eval-data.")
@click.option(
    "--train",
    "train_selectors",
    multiple=True,
    default=("all",),
    show_default=True,
    help="Parameters to train: all, new (layers marked new in surgeon.json), a glob on parameter names, or re:REGEX. Repeat for a union.",
)
@click.option("--steps", default=100, show_default=True, help="Optimizer steps; the learning-rate schedule spans them.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per packed window.")
@click.option("--batch-size", default=8, show_default=True, help="Windows per micro-batch in each process.")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches accumulated per optimizer step.")
@click.option("--lr", default=1e-4, show_default=True, help="Peak learning rate.")
@click.option("--min-lr-ratio", default=0.1, show_default=True, help="Final learning rate of the cosine decay, as a fraction of --lr.")
@click.option("--warmup-steps", default=10, show_default=True, help="Steps of linear warmup from 0 to --lr.")
@click.option("--weight-decay", default=0.1, show_default=True, help="AdamW weight decay on trainable matrices (norms and biases get none).")
@click.option("--max-grad-norm", default=1.0, show_default=True, help="Clip the global gradient L2 norm to this value (0: no clipping).")
@click.option("--save-every", default=0, show_default=True, help="Write OUT/checkpoint-STEP every N steps (0: only at the end).")
@click.option("--seed", default=0, show_default=True, help="Seed of the data order and the RNGs.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=False, show_default=True, help="Recompute activations in the backward pass to save memory.")
@click.option("--fsdp", is_flag=True, help="Shard parameters, gradients and optimizer state with FSDP2 (launch with torchrun).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True, help="Compute precision. auto uses bf16 autocast on CUDA devices with bf16 support and fp32 elsewhere.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard written, such as 500MB or 2GB.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint-STEP.")
@click.option("--stop-after", type=int, default=None, help="Save and stop after this step, keeping the schedule of --steps; continue later with --resume.")
@reports_errors
def train_command(checkpoint: Path, train_selectors: tuple[str, ...], **options: Any) -> None:
    """Fine-tune CHECKPOINT on text and write OUT/final, a normal Hugging Face checkpoint.

    Run several processes with `torchrun --nproc_per_node N $(which surgeon) train ...`.
    """
    _configure_logging()
    trainer = _import_extra("trainer")

    options["data"] = list(options["data"])
    options["eval_data"] = list(options["eval_data"])
    config = trainer.TrainConfig(checkpoint=checkpoint, train=list(train_selectors), **options)
    result = trainer.train(config)

    if os.environ.get("RANK", "0") == "0":
        where = result.final_dir or result.last_checkpoint
        click.echo(f"stopped at step {result.step}; wrote {where}" if result.final_dir is None else f"wrote {where}")


@click.command("eval")
@click.argument("checkpoint", type=existing_folder)
@click.option("--data", "data", multiple=True, required=True, type=existing_file, help="Text or JSONL file (field `text`); repeat for several.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per window; the last window may be shorter.")
@click.option("--batch-size", default=8, show_default=True, help="Windows per forward pass.")
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto", show_default=True, help="Dtype for loading the weights. auto uses bf16 on CUDA devices with bf16 support and fp32 elsewhere.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@reports_errors
def eval_command(checkpoint: Path, data: tuple[Path, ...], as_json: bool, **options: Any) -> None:
    """Report mean token loss, perplexity and tokens per second of CHECKPOINT on text files.

    The text is cut into non-overlapping windows of --seq-len tokens; each
    window's tokens after the first are scored.
    """
    _configure_logging()
    evaluate = _import_extra("evaluate")

    result = evaluate.evaluate_checkpoint(checkpoint, list(data), **options)

    if as_json:
        click.echo(json.dumps({"checkpoint": str(checkpoint), **result.to_dict()}))
        return
    click.echo(f"loss        {result.loss:.4f} nats per token")
    click.echo(f"perplexity  {result.perplexity:.3f}")
    click.echo(f"tokens      {result.tokens} in {result.windows} windows")
    click.echo(f"throughput  {result.tokens_per_second:.1f} tokens/s ({result.seconds:.2f} s)")


@click.command("plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write.")
@click.option("--title", default=None, help="Plot title.")
@reports_errors
def plot_command(runs: tuple[Path, ...], out: Path, title: str | None) -> None:
    """Draw the loss curves of one or more RUN folders (or their metrics.jsonl) into one PNG, labelled by folder name."""
    plot = _import_extra("plot")

    written = plot.plot_runs(list(runs), out, title=title)
    click.echo(f"wrote {written}")
