"""Signals during a run: stop cleanly (no new batch, commit what finished, exit 75)."""

from __future__ import annotations

import contextlib
import signal
import sys

from batch.errors import EXIT_INTERRUPTED


class Interrupted(Exception):
    """Stopped by a signal after committing every finished row."""

    exit_code = EXIT_INTERRUPTED


class StopFlag:
    """SIGTERM, SIGUSR1, SIGINT: start no new batch, finish the rows in flight, commit, exit 75. A second SIGINT: stop now."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        print(
            f"\nkomt-batch: got {signal.Signals(signum).name}: no new batch starts; finishing the rows in flight, then checkpointing "
            "(press Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @contextlib.contextmanager
    def installed(self):
        old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
