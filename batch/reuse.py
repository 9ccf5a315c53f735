"""input.reuse: successful rows of earlier outputs, found by row fingerprint."""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch.config import JobConfig
from batch.errors import JobError
from batch.results import Completion


def load_reusable(job: JobConfig) -> dict[str, Completion]:
    """Successful rows of earlier outputs (input.reuse), by row fingerprint."""
    if not job.input.reuse:
        return {}
    out = Path(job.output.path).resolve()
    found: dict[str, Completion] = {}
    # a path that exists is taken as named, even when it looks like a glob (`old[v2].parquet`)
    paths = [job.input.reuse] if Path(job.input.reuse).is_file() else sorted(glob.glob(job.input.reuse))
    paths = [p for p in paths if Path(p).resolve() != out]  # (this job's own output is not an earlier one)
    if not paths:  # (a first night, or a mistyped pattern: said, not refused)
        print(f"komt-batch: input.reuse: no earlier output matches {job.input.reuse}; every row is generated", file=sys.stderr, flush=True)
    for path in paths:
        cols = ["row_fingerprint", "finish_reason", "prompt_tokens", "completion_tokens"]
        try:
            schema = pq.read_schema(path)
            response = json.loads(schema.metadata[b"komt_batch"])["response_column"] if b"komt_batch" in (schema.metadata or {}) else "response"
            # (outputs made before the stop_reason column: their `stop` rows are redone, to have one)
            reasons = ["stop_reason"] if "stop_reason" in schema.names else []
            t = pq.read_table(path, columns=[*cols, response, *reasons])
        except (OSError, KeyError, ValueError, pa.ArrowException) as e:
            why = f"no column {e}" if isinstance(e, KeyError) else (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise JobError(f"{job.source}: input.reuse: {path} is not a readable komt-batch output ({why})") from None
        why = t.column("stop_reason").to_pylist() if reasons else [None] * t.num_rows
        for fp, reason, pt, ct, resp, stop_reason in zip(*(t.column(c).to_pylist() for c in [*cols, response]), why):
            if reason != "error" and fp and (reasons or reason != "stop"):
                found.setdefault(fp, Completion(resp, reason, pt, ct, stop_reason=stop_reason))
    return found
