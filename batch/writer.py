"""Result tables (from the checkpoint) + the input's columns -> the final Parquet file; the summary.

The final file is the input's columns, unchanged and in input order, plus the generated columns:
  <response_column>  string, null for error rows
  finish_reason      stop | eos | length | error
  stop_reason        the stop word, or the stop token's id as text, that ended the row; null otherwise
  prompt_tokens      int64
  completion_tokens  int64
  error              string, null when none ("cause: details")
  row_fingerprint    hash of the row's id, prompt and output-changing settings (for input.reuse)
Its key-value metadata `komt_batch` (JSON) records the model, adapter, quantization, generation
settings, the job file and the package version, and the fingerprints of the input and of the
settings (with the model's files) it was made from: a rerun of a finished job compares them with
its own and leaves a file that matches alone (finished.output_state).
"""

from __future__ import annotations

import glob
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch import __version__
from batch.checkpoint import (
    Checkpoint,
    Done,
    StoredPlan,
    remove_temporaries,
    write_atomic,
)
from batch.config import JobConfig
from batch.results import GENERATED_COLUMNS, RESULT_SCHEMA, ResultCounts
from batch.row_order import RowOrder
from batch.rows import Rows
from batch.signals import StopFlag

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


def finish_job(job: JobConfig, rows: Rows, ckpt: Checkpoint, done: Done, plan: StoredPlan, stop: StopFlag, summary: dict) -> dict:
    """The end of an unsharded run and of merge: the final file from every committed result, the
    summary (with the rows by finish reason and errors by cause) beside it, the checkpoint removed
    unless checkpoint.keep. A signal after the final file is written no longer stops anything."""
    counts = ResultCounts()
    out = write_output(job, rows.table, rows.release, map(counts.add, ckpt.iter_results(done)), plan.manifest)
    stop.finished()
    summary = {**summary, **counts.as_dict(), "output": str(out), "rows": rows.table.num_rows}
    write_summary(summary_path(job), summary)
    if not job.checkpoint.keep:
        ckpt.remove()
    return summary
