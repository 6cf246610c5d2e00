"""The `surgeon` command line: thin wrappers around the Python API."""

from __future__ import annotations

import click

from surgeon import __version__


@click.group()
@click.version_option(__version__, prog_name="surgeon")
def main() -> None:
    """Checkpoint surgery for large language models."""
