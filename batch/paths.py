"""The paths a job writes: checked before anything runs."""

from __future__ import annotations

import os
from pathlib import Path

from batch.config import JobConfig
from batch.errors import JobError


def check_output_writable(job: JobConfig) -> None:
    for path in (Path(job.output.path).parent, job.parts_dir):
        probe = path
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not _writable(probe):
            raise JobError(f"{job.source}: output.path: cannot write under {path} ({probe} is not a writable directory)")


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)
