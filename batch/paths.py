"""The paths a job writes -- the output, its summary, the checkpoint directory -- checked before
anything runs (by `validate`, and by `run` before the model loads), so that no run fails at its end
for a reason that was knowable at its start."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from batch.checkpoint import temporary_prefix
from batch.config import JobConfig
from batch.errors import JobError
from batch.writer import summary_path

NAME_MAX = 255  # bytes in one file or folder name, on Linux file systems
OTHER_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".jsonl.gz", ".gz", ".txt", ".arrow", ".feather", ".xlsx")  # not an output's name


def check_output_writable(job: JobConfig) -> None:
    where, out = job.source, Path(job.output.path)
    if job.output.path.endswith(("/", os.sep)) or out.name in ("", ".."):
        raise JobError(f"{where}: output.path: {job.output.path} names a directory; give the Parquet file to write, e.g. {out / 'result.parquet'}")
    files = [("output.path", out), ("output.path (its summary)", summary_path(job))]
    parts_key = "checkpoint.dir" if job.checkpoint.dir else "checkpoint.dir (default: output.path + .parts)"
    for key, path in [*files, (parts_key, job.parts_dir / "manifest.json")]:
        _check_can_create(where, key, path)
    for key, path in files:
        if path.is_dir():
            raise JobError(f"{where}: {key}: {path} is an existing directory; the job writes a file there")


def _check_can_create(where: str, key: str, path: Path) -> None:
    """Create (and delete) a file like `path` where the job will: in its folder or, where that does
    not exist yet, in the nearest folder that does (the job creates the missing ones). Asking the OS
    (os.access) is not enough: it says yes to root on a read-only file system."""
    too_long = next((name for name in path.parts if len(os.fsencode(name)) > NAME_MAX), None)
    if too_long:
        raise JobError(f"{where}: {key}: the name {too_long[:24]}... is longer than a file system allows ({NAME_MAX} bytes)")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise JobError(f"{where}: {key}: cannot write under {path.parent}: {existing} is a file, not a directory")
    try:  # named as the job's temporary files are, so that a name too long for them shows here too
        fd, probe = tempfile.mkstemp(prefix=temporary_prefix(path, "0" * 12), suffix=".tmp", dir=existing)
        os.close(fd)
        Path(probe).unlink(missing_ok=True)
    except OSError as e:
        raise JobError(f"{where}: {key}: cannot write under {path.parent}: creating a file in {existing} failed ({e.strerror})") from None


def check_output_name(job: JobConfig) -> None:
    """A new output is not named as another format's file (`out.csv` would hold Parquet). Only where
    nothing was written yet: a job under way or done with such a name goes on as before."""
    suffix = next((x for x in OTHER_FORMATS if job.output.path.lower().endswith(x)), None)
    if suffix:
        raise JobError(f"{job.source}: output.path: {job.output.path}: the output is a Parquet file, not {suffix}; name it .parquet")
