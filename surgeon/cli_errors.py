"""Failure reporting shared by every `surgeon` command: one line with the fix, and a non-zero exit status."""

from __future__ import annotations

import functools
import signal
import sys

import click

from surgeon.errors import SurgeonError

# huggingface_hub 2.x sends its requests through httpx2 and httpcore2.
NETWORK_CLIENT_MODULES = {"httpx", "httpcore", "httpx2", "httpcore2", "requests", "urllib3", "huggingface_hub", "hf_xet"}


def reports_errors(command):
    """Print a SurgeonError or an OSError as one line and exit non-zero; with --debug, show the traceback too.

    The exit status is 1, or 128 + the signal number for a run stopped by SIGINT or SIGTERM.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SurgeonError as error:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(getattr(error, "exit_code", 1))
        except KeyboardInterrupt:
            # Writing turns Ctrl-C into RunInterruptedError; this one came while planning, reading or training.
            if click.get_current_context().find_root().params.get("debug"):
                raise
            click.echo(
                "error: interrupted by Ctrl-C; no output was finished. "
                "Fix: run the command again (a `surgeon train` run continues from its last checkpoint with --resume)",
                err=True,
            )
            sys.exit(128 + signal.SIGINT)
        except OSError as error:
            if click.get_current_context().find_root().params.get("debug"):
                raise
            where = f"{error.filename}: " if error.filename else ""
            click.echo(f"error: {where}{error.strerror or error}. Fix: check the path and its permissions, or rerun with --debug", err=True)
            sys.exit(1)
        except Exception as error:
            # Network and Hub client failures surface as the clients' own exception types.
            if not type(error).__module__.split(".")[0] in NETWORK_CLIENT_MODULES:
                raise
            if click.get_current_context().find_root().params.get("debug"):
                raise
            summary = " ".join(str(error).split())[:300]
            click.echo(
                f"error: Hub request failed ({type(error).__name__}: {summary}). "
                "Fix: check your connection and HF_ENDPOINT (for downloads, HF_HUB_OFFLINE=1 uses the local cache instead)",
                err=True,
            )
            sys.exit(1)

    return wrapper
