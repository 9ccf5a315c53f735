"""What generation gives for a row (`Completion`) and the result tables the checkpoint stores.

A result table has one line per row: the row's position in the input, its planned batch, the
generated columns. The checkpoint's parts and settled rows are such tables; the writer joins them
with the input's columns for the final file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

# The columns the job adds to the input's (after the response column, whose name is configurable).
GENERATED_COLUMNS = ["finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "error", "row_fingerprint"]

RESULT_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("batch", pa.int32()),
        ("response", pa.string()),
        ("finish_reason", pa.string()),
        ("stop_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("error", pa.string()),
        ("row_fingerprint", pa.string()),
    ]
)


@dataclass
class Completion:
    response: str | None
    finish_reason: str  # stop | eos | length | error
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated for the row, the stopping one included
    error: str | None = None
    stop_reason: str | None = None  # the stop word, or the stop token's id (as text), that ended the row


def error_completion(message: str, prompt_tokens: int = 0) -> Completion:
    """A row that did not run (or failed): no response, `error` = "cause: details"."""
    return Completion(None, "error", prompt_tokens, 0, message)


def results_table(rows: list[int], batches: int | list[int], completions: list[Completion], fingerprints: list[str]) -> pa.Table:
    """Result lines of `rows`, with their planned batch (one for all, or each row's)."""
    return pa.table(
        {
            "row": pa.array(rows, pa.int64()),
            "batch": pa.array(batches if isinstance(batches, list) else [batches] * len(rows), pa.int32()),
            "response": pa.array([c.response for c in completions], pa.string()),
            "finish_reason": pa.array([c.finish_reason for c in completions], pa.string()),
            "stop_reason": pa.array([c.stop_reason for c in completions], pa.string()),
            "prompt_tokens": pa.array([c.prompt_tokens for c in completions], pa.int64()),
            "completion_tokens": pa.array([c.completion_tokens for c in completions], pa.int64()),
            "error": pa.array([c.error for c in completions], pa.string()),
            "row_fingerprint": pa.array(fingerprints, pa.string()),
        },
        schema=RESULT_SCHEMA,
    )


class ResultCounts:
    """Rows by finish reason, and error rows by cause (the part of `error` before the first colon),
    counted table by table."""

    def __init__(self):
        self.reasons: Counter = Counter()
        self.causes: Counter = Counter()

    def add(self, table: pa.Table) -> pa.Table:
        reasons = table.column("finish_reason").to_pylist()
        self.reasons.update(reasons)
        self.causes.update(e.split(":", 1)[0] for e, r in zip(table.column("error").to_pylist(), reasons) if e and r == "error")
        return table

    def as_dict(self) -> dict:
        return {"finish_reasons": dict(sorted(self.reasons.items())), "errors_by_cause": dict(sorted(self.causes.items()))}


def count_results(tables: pa.Table | Iterable[pa.Table]) -> dict:
    counts = ResultCounts()
    for table in [tables] if isinstance(tables, pa.Table) else tables:
        counts.add(table)
    return counts.as_dict()
