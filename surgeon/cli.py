"""The `surgeon` command line: thin wrappers around `surgeon.api`."""

from __future__ import annotations

import logging
import shlex
import signal
import sys

import click

from surgeon import __version__
from surgeon.cli_errors import reports_errors


def _humanize(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1000
    return f"{size} B"


@click.group()
@click.version_option(__version__, prog_name="surgeon")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Show info logs.")
def main(debug: bool, verbose: bool) -> None:
    """Checkpoint surgery for large language models."""
    level = logging.WARNING
    if verbose:
        level = logging.INFO
    if debug:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command("apply")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("paths", nargs=-1, required=True, metavar="[IN] OUT")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB or 500MB.")
@click.option("--force", is_flag=True, help="Replace a non-empty output folder once the new output is complete.")
@click.option("--resume", is_flag=True, help="Finish an interrupted run, keeping the shards it completed.")
@click.option("--no-space-check", is_flag=True, help="Write even if free disk space looks too small.")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--stream-input", is_flag=True, help="Download Hub input shards one at a time and delete each after its last use.")
@click.option("--push-to-hub", "push_repo", metavar="ORG/NAME", help="Upload the finished output to this Hub model repository.")
@click.option("--private", is_flag=True, help="With --push-to-hub, create the repository as private.")
@reports_errors
def apply_command(
    recipe: str,
    paths: tuple[str, ...],
    max_shard_size: str,
    force: bool,
    resume: bool,
    no_space_check: bool,
    quiet: bool,
    stream_input: bool,
    push_repo: str | None,
    private: bool,
) -> None:
    """Apply RECIPE to the checkpoint IN and write the result to OUT.

    IN is a folder or hf://ORG/NAME[@REVISION]. It may be left out when the
    recipe names its own source models.
    """
    from surgeon.api import apply_recipe, check_push_repo, push_output
    from surgeon.errors import HubError
    from surgeon.plan import parse_size
    from surgeon.streamed_inputs import StreamedInputs
    from surgeon.writer import WriteOptions

    if len(paths) > 2:
        raise click.UsageError("expected [IN] OUT")
    if private and not push_repo:
        raise click.UsageError("--private needs --push-to-hub")
    input_path, output_path = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])
    if push_repo:
        check_push_repo(push_repo)
    options = WriteOptions(force=force, resume=resume, check_space=not no_space_check, progress=not quiet)
    stream = StreamedInputs.for_output(output_path) if stream_input else None
    plan = apply_recipe(recipe, input_path, output_path, max_shard_size=parse_size(max_shard_size), options=options, stream=stream)
    if not quiet:
        new = sum(1 for layer in plan.layout.layers if layer.origin.new)
        click.echo(
            f"wrote {output_path}: {len(plan.layout.layers)} layers ({new} new), "
            f"{plan.parameter_count():,} parameters, {len(plan.shards)} shard(s), {_humanize(plan.output_bytes)}"
        )
    if stream is not None:
        click.echo(
            f"peak disk use: {stream.measured_peak_bytes} bytes measured, {stream.predicted_peak_bytes} bytes predicted "
            f"({stream.downloads} input shard downloads)"
        )
    if push_repo:
        retry = push_command_line(output_path, push_repo, private)
        try:
            url = push_output(output_path, push_repo, private=private)
        except HubError as error:
            error.message = f"{output_path} is written, but the push failed: {error.message}"
            error.fix = f"{error.fix}, then upload without rebuilding: `{retry}`" if error.fix else f"upload without rebuilding: `{retry}`"
            raise
        except KeyboardInterrupt:
            click.echo(f"error: {output_path} is written, but the push was interrupted. Fix: upload without rebuilding: `{retry}`", err=True)
            sys.exit(128 + signal.SIGINT)
        except Exception:
            click.echo(f"{output_path} is written, but the push failed. Upload it without rebuilding: `{retry}`", err=True)
            raise
        click.echo(f"pushed {output_path} to {url}")


@main.command("push")
@click.argument("output", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id", metavar="ORG/NAME")
@click.option("--private", is_flag=True, help="Create the repository as private if it does not exist.")
@reports_errors
def push_command(output: str, repo_id: str, private: bool) -> None:
    """Upload the finished output OUTPUT to the Hub model repository ORG/NAME.

    The quick `surgeon verify` check runs first, in which only the model card
    may differ from the written one. Only the checkpoint's own files are
    uploaded. A `surgeon train` output is checked as a checkpoint instead.
    """
    from surgeon.api import push_output

    try:
        url = push_output(output, repo_id, private=private)
    except KeyboardInterrupt:
        click.echo(f"error: the push was interrupted. Fix: run `{push_command_line(output, repo_id, private)}` again", err=True)
        sys.exit(128 + signal.SIGINT)
    click.echo(f"pushed {output} to {url}")


def push_command_line(output: str, repo_id: str, private: bool) -> str:
    """Return the shell-quoted `surgeon push` command for an output, with `--` before a path that starts with a dash."""
    separator = ["--"] if output.startswith("-") else []
    return shlex.join(["surgeon", "push", *(["--private"] if private else []), *separator, output, repo_id])


@main.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("input_path", metavar="[IN]", required=False)
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB or 500MB.")
@click.option("--stream-input", is_flag=True, help="Plan from Hub shard headers alone and print the peak disk use of a streamed apply.")
@reports_errors
def plan_command(recipe: str, input_path: str | None, max_shard_size: str, stream_input: bool) -> None:
    """Print the layer map, parameter counts and output size of RECIPE on IN, writing nothing."""
    import tempfile
    from pathlib import Path

    from surgeon.api import plan_recipe
    from surgeon.plan import parse_size
    from surgeon.streamed_inputs import StreamedInputs

    with tempfile.TemporaryDirectory(prefix="surgeon-plan-") as staging:
        stream = StreamedInputs(Path(staging)) if stream_input else None
        try:
            plan = plan_recipe(recipe, input_path, max_shard_size=parse_size(max_shard_size), stream=stream)
        finally:
            if stream is not None:
                stream.close()
    click.echo(f"recipe: {plan.recipe.name} ({plan.recipe.source_format})")
    click.echo(f"architecture: {plan.layout.arch.name}")
    click.echo("layer map (output <- source):")
    for entry in plan.layer_map():
        marker = "  NEW" if entry["new"] else ""
        click.echo(f"  {entry['index']:>4} <- {entry['source_model']}:{entry['source_layer']}{marker}  {entry['init'] if entry['new'] else ''}".rstrip())
    for key, checkpoint in plan.inputs.items():
        click.echo(f"model '{key}': {checkpoint.parameter_count():,} parameters")
    click.echo(f"output: {len(plan.layout.layers)} layers, {plan.parameter_count():,} parameters")
    kinds: dict[str, int] = {}
    for tensor in plan.tensors:
        kinds[tensor.kind] = kinds.get(tensor.kind, 0) + tensor.expr.nbytes
    click.echo("tensor data: " + ", ".join(f"{kind} {_humanize(size)}" for kind, size in sorted(kinds.items())))
    click.echo(f"output size: {_humanize(plan.output_bytes)} in {len(plan.shards)} shard(s)")
    if stream is not None:
        largest = max((header.file_size for checkpoint in plan.inputs.values() for header in checkpoint.shards), default=0)
        click.echo(
            f"peak disk use with --stream-input: {_humanize(stream.predicted_peak_bytes)} "
            f"({stream.predicted_peak_bytes} bytes; largest input shard {_humanize(largest)})"
        )


@main.command("validate")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("input_path", metavar="[IN]", required=False)
@reports_errors
def validate_command(recipe: str, input_path: str | None) -> None:
    """Check RECIPE against the schema and, given IN, against that checkpoint's headers."""
    from surgeon.api import plan_recipe
    from surgeon.recipe import load_recipe

    loaded = load_recipe(recipe)
    if input_path is None:
        click.echo(f"{recipe}: valid recipe with {len(loaded.steps)} step(s)")
        return
    plan = plan_recipe(loaded, input_path)
    click.echo(f"{recipe}: valid for {input_path}, output has {len(plan.layout.layers)} layers")


@main.command("inspect")
@click.argument("path", type=click.Path(file_okay=False))
@reports_errors
def inspect_command(path: str) -> None:
    """Print a checkpoint's architecture, layers, dtypes and parameter count."""
    from surgeon.api import inspect_checkpoint

    summary = inspect_checkpoint(path)
    click.echo(f"architecture: {summary.architecture} (model_type {summary.checkpoint.config.get('model_type')})")
    click.echo(f"layers: {summary.num_layers}")
    click.echo(f"shards: {len(summary.checkpoint.shards)}")
    click.echo(f"parameters: {summary.parameters:,}")
    click.echo("dtypes: " + ", ".join(f"{dtype} {count:,}" for dtype, count in sorted(summary.dtypes.items())))
    click.echo(f"tensor data: {_humanize(summary.total_size)}")
    click.echo("tensors per layer:")
    for suffix in summary.layer_tensors:
        info = summary.checkpoint.tensors[f"{_layer_zero_prefix(summary)}{suffix}"]
        click.echo(f"  {suffix}  {info.dtype} {list(info.shape)}")
    click.echo("other tensors:")
    for name in summary.global_tensors:
        info = summary.checkpoint.tensors[name]
        click.echo(f"  {name}  {info.dtype} {list(info.shape)}")


def _layer_zero_prefix(summary) -> str:
    from surgeon.architectures import detect_architecture

    return detect_architecture(summary.checkpoint.config, "").layer_prefix.format(0)


@main.command("verify")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--deep", is_flag=True, help="Also compare every tensor's bytes with the recipe applied to the recorded inputs (reads all of them).")
@reports_errors
def verify_command(output: str, deep: bool) -> None:
    """Recheck the finished output OUTPUT against its surgeon.json manifest."""
    from surgeon.verify import verify_output

    report = verify_output(output, deep=deep)
    compared = f", {_humanize(report.compared_bytes)} of tensor data compared with the inputs" if deep else ""
    click.echo(f"verified {output}: {report.shards} shard(s), {report.tensors} tensors{compared}")


@main.command("recipes")
def recipes_command() -> None:
    """List the recipes shipped with surgeon, one line each."""
    from surgeon.recipe.catalog import shipped_recipes

    for path, description in shipped_recipes():
        click.echo(f"{path.stem:<20} {description}")


from surgeon.train.commands import eval_command, plot_command, train_command  # noqa: E402

main.add_command(train_command)
main.add_command(eval_command)
main.add_command(plot_command)
