"""The final file, streamed (writer.write_output + row_order): results from many tables in any
order, spilled as sorted runs and merged range by range, give exactly the file that joining them in
memory gives, row groups and all columns; a missing or doubled row writes nothing."""

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batch import row_order, writer
from batch.config import load_job
from batch.errors import IncompleteError
from batch.results import GENERATED_COLUMNS, RESULT_SCHEMA
from tests.conftest import make_job

N = 1000


def inputs() -> pa.Table:
    rng = random.Random(7)
    return pa.table(
        {
            "id": [f"r{i:04d}" for i in range(N)],
            "instruction": ["질문 " * rng.randint(1, 30) for _ in range(N)],
            "score": pa.array([None if i % 7 == 0 else i * 0.5 for i in range(N)], pa.float64()),
            "tags": pa.array([["a", "b"][: i % 3] for i in range(N)], pa.list_(pa.string())),
            "meta": pa.array([{"k": i, "s": str(i)} for i in range(N)]),
        }
    )


def results(rows: list[int]) -> pa.Table:
    return pa.table(
        {
            "row": pa.array(rows, pa.int64()),
            "batch": pa.array([r % 13 for r in rows], pa.int32()),
            "response": pa.array([None if r % 11 == 0 else f"답변 {r} " + "가" * (r % 50) for r in rows], pa.string()),
            "finish_reason": pa.array(["error" if r % 11 == 0 else "stop" for r in rows], pa.string()),
            "stop_reason": pa.array([None if r % 11 == 0 else "###" for r in rows], pa.string()),
            "prompt_tokens": pa.array([r % 97 for r in rows], pa.int64()),
            "completion_tokens": pa.array([r % 31 for r in rows], pa.int64()),
            "error": pa.array(["too_long: x" if r % 11 == 0 else None for r in rows], pa.string()),
            "row_fingerprint": pa.array([f"{r:032x}" for r in rows], pa.string()),
        },
        schema=RESULT_SCHEMA,
    )


def scattered(rows: list[int], parts: int, seed: int = 3) -> list[pa.Table]:
    """The results of `rows` in many small tables, in a random order (as parts finish)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    step = -(-len(rows) // parts)
    return [results(rows[i : i + step]) for i in range(0, len(rows), step)]


@pytest.fixture
def job(tmp_path):
    return load_job(str(make_job(tmp_path, tmp_path / "unused.jsonl")), [], {})


def expected(table: pa.Table, job) -> pa.Table:
    res = pa.concat_tables(scattered(range(N), 1))
    res = res.take(pc.sort_indices(res.column("row")))
    out = table.append_column(job.output.response_column, res.column("response"))
    for name in GENERATED_COLUMNS:
        out = out.append_column(name, res.column(name))
    return out


@pytest.mark.parametrize("run_bytes, group_bytes, runs_spilled, groups", [(None, None, 0, 1), (20_000, 1, 7, 16), (1, 10**9, 40, 1)])
def test_streamed_output_equals_the_table_joined_in_memory(job, monkeypatch, run_bytes, group_bytes, runs_spilled, groups):
    """Default sizes (one run in memory, one row group), small runs and the smallest groups (64
    rows), and a run per table into one group."""
    if run_bytes:
        monkeypatch.setattr(row_order, "RUN_BYTES", run_bytes)
        monkeypatch.setattr(writer, "GROUP_BYTES", group_bytes)
    table = inputs()
    spills = []
    original = row_order.RowOrder._spill_run
    monkeypatch.setattr(row_order.RowOrder, "_spill_run", lambda self: (spills.append(1), original(self)))
    out = writer.write_output(job, table, lambda: None, scattered(range(N), 40), {"input": {}, "settings": {}})
    written = pq.read_table(out)
    assert written.equals(expected(table, job))
    meta = pq.read_metadata(out)
    assert len(spills) == runs_spilled
    assert meta.num_row_groups == groups
    assert b"komt_batch" in written.schema.metadata
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # the runs' folder is gone


@pytest.mark.parametrize("change", ["missing", "twice"])
def test_a_missing_or_doubled_row_writes_nothing(job, monkeypatch, change):
    monkeypatch.setattr(row_order, "RUN_BYTES", 20_000)
    rows = [r for r in range(N) if r != 517] if change == "missing" else [*range(N), 517]
    with pytest.raises(IncompleteError, match="517"):
        writer.write_output(job, inputs(), lambda: None, scattered(rows, 10), {"input": {}, "settings": {}})
    out = Path(job.output.path)
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no file, no runs left behind


def test_an_empty_input_gives_an_empty_file_with_every_column(job):
    table = inputs().slice(0, 0)
    out = writer.write_output(job, table, lambda: None, [], {"input": {}, "settings": {}})
    written = pq.read_table(out)
    assert written.num_rows == 0
    assert written.column_names == [*table.column_names, job.output.response_column, *GENERATED_COLUMNS]
