"""Result tables (from the checkpoint) + the input's columns -> the final Parquet file; the summary.

The final file is the input's columns, unchanged and in input order, plus the generated columns:
  <response_column>  string, null for error rows
  finish_reason      stop | eos | length | error
  prompt_tokens      int64
  completion_tokens  int64
  error              string, null when none ("cause: details")
  row_fingerprint    hash of the row's id, prompt and output-changing settings (for input.reuse)
Its key-value metadata `komt_batch` (JSON) records the model, adapter, quantization, generation
settings, the job file and the package version.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from batch import __version__
from batch.checkpoint import write_atomic, write_parquet_atomic
from batch.config import JobConfig
from batch.errors import IncompleteError
from batch.results import GENERATED_COLUMNS


def job_metadata(job: JobConfig) -> dict[str, str]:
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
    }
    return {"komt_batch": json.dumps(info, ensure_ascii=False)}


def assemble(job: JobConfig, inputs: pa.Table, results: pa.Table) -> Path:
    """Write the final file: every input row exactly once, in input order, with its results."""
    n = inputs.num_rows
    rows = results.column("row")
    if results.num_rows != n or (n and pc.count_distinct(rows).as_py() != n):
        have = set(rows.to_pylist())
        missing = [i for i in range(n) if i not in have]
        raise IncompleteError(f"{job.parts_dir}: {len(missing)} of {n} rows have no result yet (e.g. rows {missing[:5]})")
    ordered = results.take(pc.sort_indices(rows))
    table = inputs.append_column(job.output.response_column, ordered.column("response"))
    for name in GENERATED_COLUMNS:
        table = table.append_column(name, ordered.column(name))
    out = Path(job.output.path)
    write_parquet_atomic(out, table, job_metadata(job))
    return out


def summary_path(job: JobConfig) -> Path:
    out = Path(job.output.path)
    return out.with_name(out.stem + ".summary.json")


def write_summary(path: Path, summary: dict) -> None:
    text = json.dumps(summary, indent=1, ensure_ascii=False) + "\n"
    write_atomic(path, lambda fh: fh.write(text.encode()))
