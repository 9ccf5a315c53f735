"""Signals, from the process's first instant to its last.

cli.main installs the handlers before the heavy imports (torch, transformers), so a signal at
start-up is recorded instead of killing the process: the run then stops before doing any work
(exit 75, nothing to lose). During a run, SIGTERM, SIGUSR1, SIGHUP and SIGINT mean: start no new
batch, finish the rows in flight, commit them, exit 75; a second SIGINT stops at once (exit 130).
Once the work is complete (the final file or a shard's last part is written) a signal changes
nothing: the exit code is 0. When the process is about to end, the signals are ignored, so the
exit code decided by main holds through the interpreter's teardown too.
"""

from __future__ import annotations

import signal
import sys

from batch.errors import EXIT_INTERRUPTED


class Interrupted(Exception):
    """Stopped by a signal; what was finished is committed (str(error) says what happened)."""

    exit_code = EXIT_INTERRUPTED


class StopFlag:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.complete = False  # the work is written: a signal no longer matters
        self.working: str | None = None  # past start-up's checks: what a signal now leads to (said when one comes)
        self._previous: dict[int, object] = {}

    @classmethod
    def install(cls) -> StopFlag:
        flag = cls()
        flag._previous = {s: signal.signal(s, flag._handle) for s in cls.SIGNALS}
        return flag

    def restore(self) -> None:
        """Put back the handlers there were before install (main called in-process, e.g. by tests)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def ignore(self) -> None:
        """Ignore the signals from here to the process's exit (Python's teardown would otherwise
        restore the default action, which ends the process with 128 + the signal's number)."""
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def start_work(self, on_signal: str = "no new batch starts; finishing the rows in flight, then checkpointing") -> None:
        """Start-up's checks are passed: from now on a signal lets the work in hand finish (`on_signal` says how)."""
        self.working = on_signal

    def finished(self) -> None:
        """The work is written: from now on a signal changes nothing."""
        self.complete = True

    def check(self, what: str) -> None:
        """Stop here if a signal came: raise Interrupted saying what was (or was not) done."""
        if self.received is not None and not self.complete:
            raise Interrupted(f"stopped by {self.name} {what}")

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name

    def _handle(self, signum, frame):
        new_line = "\n" if sys.stderr.isatty() else ""  # (past a progress bar's line; not in a log)
        if self.complete:
            self.received = signum
            print(f"{new_line}komt-batch: got {signal.Signals(signum).name} after the work was written; exiting as done", file=sys.stderr, flush=True)
            return
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if not self.working:
            print(f"{new_line}komt-batch: got {self.name} during start-up: stopping before any work", file=sys.stderr, flush=True)
            return
        again = " (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        print(f"{new_line}komt-batch: got {self.name}: {self.working}{again}", file=sys.stderr, flush=True)
