"""Turn SIGINT and SIGTERM into an exception while the writer runs.

The default SIGTERM action ends the process at once, and SIGINT raises
KeyboardInterrupt with a traceback. Raising RunInterruptedError instead lets
the writer unwind normally: the shard being written is discarded, the journal
still lists only finished shards, and the CLI prints how to resume.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from surgeon.errors import RunInterruptedError

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptGuard:
    """Signal handlers that raise RunInterruptedError until `finish_uninterrupted()` is called."""

    def __init__(self, partial: Path) -> None:
        self.partial = partial
        self.pending: int | None = None
        self.deferring = False

    def handle(self, signal_number: int, frame) -> None:
        if self.deferring:
            self.pending = signal_number
            logger.warning("received %s while moving the finished output into place; finishing first", signal.Signals(signal_number).name)
            return
        self.raise_interrupted(signal_number)

    def raise_interrupted(self, signal_number: int) -> None:
        name = signal.Signals(signal_number).name
        raise RunInterruptedError(
            f"interrupted by {name}; the finished shards are kept in the partial output",
            path=self.partial,
            signal_number=signal_number,
            fix="rerun the same command with --resume to finish the output",
        )

    def finish_uninterrupted(self) -> None:
        """Ignore SIGINT and SIGTERM from now on, so renaming the output into place is never cut short.

        A signal that arrives after this is logged; the run then completes and the output is whole.
        """
        self.deferring = True


@contextmanager
def interrupts_raise(partial: Path) -> Iterator[InterruptGuard]:
    """Install the handlers for the block; outside the main thread, signals keep their default action."""
    guard = InterruptGuard(partial)
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return

    previous = {number: signal.signal(number, guard.handle) for number in HANDLED_SIGNALS}
    try:
        yield guard
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
