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
settings (with the model's files) it was made from, and the plan_id of the plan it was made by: a
rerun of a finished job compares them with its own and leaves a file that matches alone
(finished.output_state), and finishes what a run stopped after the final file left (finish_leftovers).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch import __version__
from batch.checkpoint import (
    Checkpoint,
    Done,
    StoredPlan,
    remove_temporaries,
    temporary_prefix,
    write_atomic,
)
from batch.config import JobConfig
from batch.results import GENERATED_COLUMNS, RESULT_SCHEMA, count_results
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
        "plan_id": made_from.get("plan_id"),
    }
    return {"komt_batch": json.dumps(info, ensure_ascii=False)}


def write_output(job: JobConfig, inputs: pa.Table, release: Callable[[], None], results: Iterable[pa.Table], made_from: dict, token: str = "0" * 12) -> Path:
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
    with RowOrder(n, out.parent, temporary_prefix(out, token)) as ordered:
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

        write_atomic(out, write, token)
    return out


def summary_path(job: JobConfig) -> Path:
    out = Path(job.output.path)
    return out.with_name(out.stem + ".summary.json")


def write_summary(path: Path, summary: dict, token: str) -> None:
    text = json.dumps(summary, indent=1, ensure_ascii=False) + "\n"
    write_atomic(path, lambda fh: fh.write(text.encode()), token)


def remove_stale_temporaries(job: JobConfig, ckpt: Checkpoint) -> None:
    """Temporary files of the output and its summary that a kill of this checkpoint's runs left
    (their names carry its token; call it holding the job lock exclusively: only that holder
    writes them). Nothing else in the output's folder is touched."""
    out = Path(job.output.path)
    remove_temporaries(out.parent, "|".join(re.escape(p.name) for p in (out, summary_path(job))), ckpt.token)


def finish_job(job: JobConfig, rows: Rows, ckpt: Checkpoint, done: Done, plan: StoredPlan, stop: StopFlag, summary: dict) -> dict:
    """The end of an unsharded run and of merge: the summary (with the rows by finish reason and
    errors by cause) into the checkpoint, the final file from every committed result, the summary
    beside it, the checkpoint removed unless checkpoint.keep. A run stopped after the final file
    (a kill, a full disk at the summary) leaves the rest to the next run or merge, which finishes
    it (finish_leftovers). A signal after the final file is written no longer stops anything."""
    counts = count_results(ckpt.iter_results(done, ["row", "finish_reason", "error"]))
    summary = {**summary, **counts, "output": str(Path(job.output.path)), "rows": rows.table.num_rows}
    write_summary(ckpt.summary_path, {**summary, "plan_id": plan.plan_id}, ckpt.token)
    write_output(job, rows.table, rows.release, ckpt.iter_results(done), plan.manifest, ckpt.token)
    stop.finished()
    write_summary(summary_path(job), summary, ckpt.token)
    ckpt.summary_path.unlink()  # (written beside the output: no longer left to do)
    if not job.checkpoint.keep:
        ckpt.remove()
    return summary


def output_plan_id(job: JobConfig) -> str | None:
    """The plan_id recorded in the output's metadata (None: none, or an output of an earlier version)."""
    try:
        return json.loads(pq.read_schema(job.output.path).metadata[b"komt_batch"]).get("plan_id")
    except (OSError, KeyError, TypeError, ValueError, AttributeError, pa.ArrowException):
        return None


def leftovers(job: JobConfig, ckpt: Checkpoint) -> list[str]:
    """What a run that wrote this finished output (state done) left undone, when it was stopped
    after the final file: "the summary" (kept in its checkpoint), "the checkpoint" (this job's,
    of the plan that made the output). Read only."""
    made_by = output_plan_id(job)
    if made_by is None or ckpt.mark(fresh=True) is None:
        return []
    left = []
    try:
        pending = json.loads(ckpt.summary_path.read_bytes())
        if pending.get("plan_id") == made_by:
            left.append("the summary")
    except (OSError, ValueError, AttributeError):
        pass
    try:
        stored = json.loads(ckpt.manifest_path.read_bytes()).get("plan_id")
    except (OSError, ValueError, AttributeError):
        stored = None  # no plan: nothing in the checkpoint can be resumed
    if not job.checkpoint.keep and stored in (None, made_by):  # (the job's own: checkpoint.json is there)
        left.append("the checkpoint")
    return left


def finish_leftovers(job: JobConfig, ckpt: Checkpoint) -> list[str]:
    """Finish what a run stopped after the final file left: write the summary beside the output
    (from the copy in the checkpoint), remove the checkpoint. Call holding the job lock exclusively.
    Returns what was finished (said on stderr)."""
    left = leftovers(job, ckpt)
    if "the summary" in left:
        pending = json.loads(ckpt.summary_path.read_bytes())
        pending.pop("plan_id")
        write_summary(summary_path(job), pending, ckpt.token)
        ckpt.summary_path.unlink()
    if "the checkpoint" in left:
        ckpt.remove()
    if left:
        print(f"komt-batch: finished what the run that wrote {job.output.path} left: {' and '.join(left)}", file=sys.stderr, flush=True)
    return left
