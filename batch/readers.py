"""Input: a .jsonl or .parquet file, a glob, or a directory of such files -> one Arrow table.

The input is read once into Arrow memory (compact: about the size of the text itself), because the
final file repeats every input column in input order. Every problem with a file ends in JobError
naming the file (and line, for JSONL).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch.errors import JobError

SUFFIXES = (".jsonl", ".parquet")
_JSONL_BATCH = 20_000  # lines parsed into one Arrow batch: bounds the Python objects alive at once


def input_files(path: str) -> list[Path]:
    """The files named by input.path, sorted, so that row positions are stable."""
    p = Path(path)
    if any(ch in path for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if f.endswith(SUFFIXES))
        if not files:
            raise JobError(f"input.path: the glob {path!r} matches no .jsonl or .parquet file")
        return files
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES and f.is_file())
        if not files:
            raise JobError(f"input.path: the directory {path} holds no .jsonl or .parquet file")
        return files
    if not p.exists():
        raise JobError(f"input.path: {path}: no such file")
    if p.suffix not in SUFFIXES:
        raise JobError(f"input.path: {path}: expected a .jsonl or .parquet file")
    return [p]


def read_table(files: list[Path]) -> pa.Table:
    """All rows of all files, in file order then row order, as one table."""
    tables = [_read_parquet(f) if f.suffix == ".parquet" else _read_jsonl(f) for f in files]
    first = tables[0]
    for f, t in zip(files[1:], tables[1:]):
        if set(t.column_names) != set(first.column_names):
            missing = sorted(set(first.column_names) - set(t.column_names))
            extra = sorted(set(t.column_names) - set(first.column_names))
            raise JobError(
                f"{f}: its columns disagree with {files[0]}"
                + (f"; missing {missing}" if missing else "")
                + (f"; extra {extra}" if extra else "")
            )
    if len(tables) == 1:
        return first
    try:
        return pa.concat_tables([t.select(first.column_names) for t in tables], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise JobError(f"{files[0].parent}: the input files' column types disagree: {e}") from None


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise JobError(f"{path}: not a readable Parquet file ({e})") from None


def _read_jsonl(path: Path) -> pa.Table:
    batches: list[pa.Table] = []
    rows: list[dict] = []
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise JobError(f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JobError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise JobError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                if len(rows) >= _JSONL_BATCH:
                    batches.append(_rows_to_table(rows, path, lineno))
                    rows = []
    except OSError as e:
        raise JobError(f"{path}: cannot read ({e.strerror})") from None
    if rows or not batches:
        batches.append(_rows_to_table(rows, path, None))
    if len(batches) == 1:
        return batches[0]
    try:
        return pa.concat_tables(batches, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise JobError(f"{path}: a column changes type between rows: {e}") from None


def _rows_to_table(rows: list[dict], path: Path, lineno: int | None) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        at = f" (before line {lineno})" if lineno else ""
        raise JobError(f"{path}{at}: a column has values of mixed types: {e}") from None


def row_ids(table: pa.Table, id_column: str | None, source: str) -> list[str]:
    """Each row's id as a string: the id column's value, or the row's position in the input."""
    if id_column is None:
        return [str(i) for i in range(table.num_rows)]
    if id_column not in table.column_names:
        raise JobError(
            f"{source}: input.id_column: column {id_column!r} is not in the input (columns: {table.column_names})"
        )
    col = table.column(id_column)
    if col.null_count:
        raise JobError(f"{source}: input.id_column: {col.null_count} row(s) have no {id_column!r}")
    ids = [str(v) for v in col.to_pylist()]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dupes = []
        for i in ids:
            if i in seen and i not in dupes:
                dupes.append(i)
            seen.add(i)
        shown = ", ".join(repr(d) for d in dupes[:5])
        raise JobError(f"{source}: input.id_column: duplicate ids in the input ({len(dupes)}), e.g. {shown}")
    return ids
