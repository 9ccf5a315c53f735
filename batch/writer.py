"""Result tables (from the checkpoint) + the input's columns -> the final Parquet file; the summary.

The final file is the input's columns, unchanged and in input order, plus the generated columns:
  <response_column>  string, null for error rows
  finish_reason      stop | eos | length | error
  prompt_tokens      int64
  completion_tokens  int64
  error              string, null when none ("cause: details")
  row_fingerprint    hash of the row's id, prompt and output-changing settings (for input.reuse)
Its key-value metadata `komt_batch` (JSON) records the model, adapter, quantization, generation
settings, the job file and the package version, and the fingerprints of the input and of the
settings (with the model's files) it was made from: a rerun of a finished job compares them with
its own and leaves a file that matches alone (`output_state`).
"""

from __future__ import annotations

import glob
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch import __version__
from batch.checkpoint import remove_temporaries, write_atomic
from batch.config import JobConfig
from batch.errors import JobError
from batch.fingerprints import plan_changes
from batch.results import GENERATED_COLUMNS, RESULT_SCHEMA
from batch.row_order import RowOrder

GROUP_BYTES = 64 << 20  # about this much input and results per row group of the final file
MIN_GROUP_ROWS, MAX_GROUP_ROWS = 64, 1 << 20


def job_metadata(job: JobConfig, made_from: dict) -> dict[str, str]:
    """The output's `komt_batch` metadata; made_from: the plan's input and settings fingerprints."""
    m = job.model
    info = {
        "package": "komt-batch",
        "version": __version__,
        "model": m.base,
        "adapter": m.adapter,
        "quantization": m.quantization,
        "compute_dtype": m.compute_dtype,
        "generation": job.as_dict()["generation"],
        "template": job.prompt.template,
        "response_column": job.output.response_column,
        "job_file": job.source,
        "job": job.text,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "input": made_from["input"],
        "settings": made_from["settings"],
    }
    return {"komt_batch": json.dumps(info, ensure_ascii=False)}


def write_output(job: JobConfig, inputs: pa.Table, release: Callable[[], None], results: Iterable[pa.Table], made_from: dict) -> Path:
    """Write the final file: every input row exactly once, in input order, with its results.

    Streamed in bounded memory: the results are put in row order by an external sort (row_order),
    then each row group joins a slice of the (memory-mapped) input with the results of its rows.
    Row groups hold about GROUP_BYTES. Nothing is written unless every row has one result."""
    out = Path(job.output.path)
    n = inputs.num_rows
    schema = inputs.schema
    for name, field in [(job.output.response_column, RESULT_SCHEMA.field("response")), *((c, RESULT_SCHEMA.field(c)) for c in GENERATED_COLUMNS)]:
        schema = schema.append(pa.field(name, field.type))
    schema = schema.with_metadata({**(inputs.schema.metadata or {}), **job_metadata(job, made_from)})
    with RowOrder(n, out.parent, f".{out.name}.") as ordered:
        for table in results:
            ordered.add(table)
        ordered.check_complete(str(job.parts_dir))
        group = int(min(MAX_GROUP_ROWS, max(MIN_GROUP_ROWS, GROUP_BYTES // max(1.0, inputs.get_total_buffer_size() / max(n, 1) + ordered.bytes_per_row()))))

        def write(fh):
            with pq.ParquetWriter(fh, schema, compression="zstd", write_page_checksum=True) as w:
                for a in range(0, n, group):
                    b = min(n, a + group)
                    res = ordered.take(a, b)
                    columns = [*inputs.slice(a, b - a).columns, res.column("response"), *(res.column(c) for c in GENERATED_COLUMNS)]
                    w.write_table(pa.table(columns, schema=schema), row_group_size=b - a)
                    release()

        write_atomic(out, write)
    return out


def summary_path(job: JobConfig) -> Path:
    out = Path(job.output.path)
    return out.with_name(out.stem + ".summary.json")


def write_summary(path: Path, summary: dict) -> None:
    text = json.dumps(summary, indent=1, ensure_ascii=False) + "\n"
    write_atomic(path, lambda fh: fh.write(text.encode()))


def remove_stale_temporaries(job: JobConfig) -> None:
    """Temporary files of the output and its summary that a kill left (call it holding the job lock
    exclusively: only that holder writes them). Nothing else in the output's folder is touched."""
    for path in (Path(job.output.path), summary_path(job)):
        remove_temporaries(path.parent, glob.escape(path.name))


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
        changes = plan_changes(made_from, input_fp, settings_fp)
    except (KeyError, TypeError, AttributeError):
        return "changed", ["it records no fingerprints (an earlier komt-batch version)"]
    return ("changed", changes) if changes else ("done", [])


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
        + ". Run with --restart to regenerate it, or choose another output.path"
    )
