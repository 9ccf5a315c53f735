"""What is at output.path before a job writes: nothing, this job's finished file (left alone), a
file of this job from another input or settings, or a file komt-batch did not write (never replaced)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch.config import JobConfig
from batch.errors import JobError
from batch.fingerprints import plan_changes


def output_state(job: JobConfig, input_fp: dict, settings_fp: dict) -> tuple[str, list[str]]:
    """What is at output.path: ("absent", []), ("done", []) when this job wrote it from the same input
    and settings, ("changed", what differs) when a komt-batch run wrote it from others, or
    ("foreign", []) when komt-batch did not write it."""
    out = Path(job.output.path)
    if not out.exists():
        return "absent", []
    try:
        made_from = json.loads(pq.read_schema(out).metadata[b"komt_batch"])
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return "foreign", []
    try:
        changes = plan_changes(made_from, input_fp, settings_fp) + output_changes(made_from, job)
    except (KeyError, TypeError, AttributeError):
        return "changed", ["it records no fingerprints (an earlier komt-batch version)"]
    return ("changed", changes) if changes else ("done", [])


def output_changes(made_from: dict, job: JobConfig) -> list[str]:
    """Settings that change the output file but not a row's result (so not the plan): its columns.
    A finished output is "the same" only if these are the same too."""
    was, now = made_from.get("response_column", "response"), job.output.response_column
    return [] if was == now else [f"output.response_column: {was!r} -> {now!r}"]


def already_done(job: JobConfig, rows: int) -> dict:
    """What run and merge say about a finished output they leave alone."""
    print(
        f"komt-batch: {job.output.path} is done: this job wrote it from the same input and settings; "
        "nothing to do (--restart regenerates it)",
        file=sys.stderr,
        flush=True,
    )
    return {"job": job.source, "state": "done", "output": job.output.path, "rows": rows}


def refuse_to_replace(job: JobConfig, state: str, changes: list[str]) -> JobError:
    out = job.output.path
    if state == "foreign":
        return JobError(f"{job.source}: output.path: {out} exists and komt-batch did not write it; move it away or choose another output.path")
    return JobError(
        f"{job.source}: output.path: {out} was written from another input or settings: " + "; ".join(changes)
        + f". Run with --restart to regenerate it, or choose another output.path (with input.reuse={out}, only rows that"
        " changed or are new are generated)"
    )
