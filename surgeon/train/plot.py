"""Draw the loss curves of several training runs into one PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from surgeon.errors import TrainingError  # noqa: E402

METRICS_NAME = "metrics.jsonl"


def read_run_metrics(run: Path) -> list[dict[str, Any]]:
    """Read `RUN/metrics.jsonl`; `run` may also be the metrics file itself."""
    metrics_path = run if run.is_file() else run / METRICS_NAME
    if not metrics_path.is_file():
        raise TrainingError("metrics.jsonl not found", path=metrics_path, fix="pass the --out folder of a surgeon train run")

    records = []
    with metrics_path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise TrainingError(f"invalid JSON: {error.msg}", path=metrics_path, line=line_number) from error
    return records


def run_labels(runs: Sequence[Path]) -> list[str]:
    """Label each run by its folder name, adding parent folders until the labels are distinct."""
    folders = [(run.parent if run.is_file() else run).resolve() for run in runs]
    depths = [1] * len(folders)
    while True:
        labels = ["/".join(folder.parts[-depth:]) for folder, depth in zip(folders, depths)]
        clashing = [index for index, label in enumerate(labels) if labels.count(label) > 1 and depths[index] < len(folders[index].parts)]
        if not clashing:
            return labels
        for index in clashing:
            depths[index] += 1


def plot_runs(runs: Sequence[Path], out: Path, *, title: str | None = None) -> Path:
    """Draw training loss (solid) and held-out eval loss (dashed, with markers) against step for each run."""
    if not runs:
        raise TrainingError("no runs given", fix="pass one or more run folders")

    figure, axes = plt.subplots(figsize=(8, 5))
    for run, label in zip(runs, run_labels(runs)):
        records = read_run_metrics(run)
        train_points = [(record["step"], record["loss"]) for record in records if "loss" in record]
        eval_points = [(record["step"], record["eval_loss"]) for record in records if "eval_loss" in record]

        color = None
        if train_points:
            steps, losses = zip(*train_points)
            (line,) = axes.plot(steps, losses, label=f"{label} train")
            color = line.get_color()
        if eval_points:
            steps, losses = zip(*eval_points)
            axes.plot(steps, losses, linestyle="--", marker="o", markersize=3, color=color, label=f"{label} eval")

    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(title or "training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()

    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
