"""The job's input rows: the table the readers give (memory-mapped), each row's id, and its prompt
from the template.

Nothing here holds the whole input in memory: the table is mapped, prompts are rendered a slice at a
time and the pages a slice read are released after it (they count as resident memory while
mapped), and ids are read from the table when asked for."""

from __future__ import annotations

import bisect
import fnmatch
import glob
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from batch.checkpoint import OWNED
from batch.config import JobConfig
from batch.errors import JobError
from batch.hf_datasets import hub_dataset_files, is_saved_dataset, saved_dataset_files
from batch.readers import SUFFIXES, MappedInput, input_files, input_root, open_arrow, read_files, row_places
from batch.results import GENERATED_COLUMNS
from batch.template import Template

PROMPT_SLICE = 8192  # rows rendered and tokenized at a time while planning


@dataclass
class Rows:
    files: list[Path]  # the input files, or a dataset's Arrow files
    table: pa.Table  # memory-mapped: read slices, then release()
    ids: RowIds
    template: Template
    release: Callable[[], None] = lambda: None  # drop the pages read so far from this process's memory

    def prompts(self, indices: list[int]) -> list[str | ValueError]:
        """The prompts of these rows; a row whose template field is bad gives its ValueError."""
        values = self.table.select(list(self.template.fields)).take(indices).to_pylist()
        self.release()
        return [_render(self.template, v) for v in values]

    def slices(self):
        """(first row, prompts) for consecutive slices of the input."""
        fields = list(self.template.fields)
        for start in range(0, self.table.num_rows, PROMPT_SLICE):
            values = self.table.slice(start, PROMPT_SLICE).select(fields).to_pylist()
            self.release()
            yield start, [_render(self.template, v) for v in values]


class RowIds(Sequence):
    """Each row's id as a string: the id column's value, or the row's position in the input.

    Read from the table when asked ([i], [a:b], len, iteration), not held: 10 million ids as Python
    strings would take about 700 MB. Reading row after row loads a block of ids at a time."""

    BLOCK = 8192

    def __init__(self, column: pa.ChunkedArray | None, rows: int):
        self.column, self.rows = column, rows
        self.block_start, self.block = 0, []
        self.ends = np.cumsum([len(c) for c in column.chunks]).tolist() if column is not None else []
        self.next = 0  # the row after the last one asked for: asked for next, it loads a block

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self.rows)
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return self._read(start, max(stop - start, 0))
        if i < 0:
            i += self.rows
        if not 0 <= i < self.rows:
            raise IndexError(f"row {i} of {self.rows}")
        if not self.block_start <= i < self.block_start + len(self.block):
            if i != self.next:  # random access (generation order): the one id
                self.next = i + 1
                return self._one(i)
            self.block_start, self.block = i, self._read(i, self.BLOCK)
        self.next = i + 1
        return self.block[i - self.block_start]

    def _read(self, start: int, n: int) -> list[str]:
        if self.column is None:
            return [str(r) for r in range(start, min(start + n, self.rows))]
        return [str(v) for v in self.column.slice(start, n).to_pylist()]

    def _one(self, i: int) -> str:
        if self.column is None:
            return str(i)
        c = bisect.bisect_right(self.ends, i)
        return str(self.column.chunk(c)[i - (self.ends[c - 1] if c else 0)].as_py())


def row_ids(table: pa.Table, id_column: str | None, source: str, release: Callable[[], None] = lambda: None, files: list[Path] = ()) -> RowIds:
    """Each row's id (see RowIds); the id column must name a column with an id on every row, each
    once (the first id given twice is shown where it is in `files`, the input's files)."""
    if id_column is None:
        return RowIds(None, table.num_rows)
    if id_column not in table.column_names:
        raise JobError(
            f"{source}: input.id_column: column {id_column!r} is not in the input (columns: {', '.join(table.column_names)})"
        )
    col = table.column(id_column)
    if col.null_count:
        raise JobError(f"{source}: input.id_column: {col.null_count} row(s) have no {id_column!r}")
    ids = RowIds(col, table.num_rows)
    dupes = _duplicates(ids, release)
    if dupes:
        shown = ", ".join(repr(d) for d in dupes[:5])
        first = list(itertools.islice((i for i, v in enumerate(ids) if v == dupes[0]), 2))
        where = f"; {dupes[0]!r} is at {' and '.join(row_places(files, first))}" if files else ""
        raise JobError(f"{source}: input.id_column: duplicate ids in the input ({len(dupes)}), e.g. {shown}{where}")
    return ids


def _duplicates(ids: RowIds, release: Callable[[], None]) -> list[str]:
    """The ids that appear more than once, in the order of their second appearance.

    8 bytes a row, not a set of every id: the ids' hashes are sorted, and only ids whose hash
    appears twice (duplicates, or rarely two ids with one hash) are compared as text."""
    hashes = np.empty(len(ids), np.int64)
    for start in range(0, len(ids), RowIds.BLOCK):
        block = ids[start : start + RowIds.BLOCK]
        hashes[start : start + len(block)] = [hash(i) for i in block]
        release()
    hashes.sort()
    twice = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not twice:
        return []
    seen: set[str] = set()
    dupes: dict[str, None] = {}
    for start in range(0, len(ids), RowIds.BLOCK):
        for i in ids[start : start + RowIds.BLOCK]:
            if hash(i) in twice:
                if i in seen:
                    dupes.setdefault(i)
                seen.add(i)
        release()
    return list(dupes)


def _render(template: Template, values: dict) -> str | ValueError:
    try:
        return template.render(values)
    except ValueError as e:
        return e


def open_input(job: JobConfig) -> MappedInput:
    """The job's input, memory-mapped: a Hub dataset, a save_to_disk folder, or files."""
    where, cfg = job.source, job.input
    if cfg.dataset:
        files = hub_dataset_files(cfg.dataset, cfg.config, cfg.split, where)
        return open_arrow(files, files)
    if is_saved_dataset(cfg.path):
        files = saved_dataset_files(cfg.path, cfg.split, where)
        return open_arrow(files, files)
    if cfg.split is not None:
        raise JobError(f"{where}: input.split: only for input.dataset or a save_to_disk folder of a DatasetDict")
    try:
        files = input_files(cfg.path)
    except JobError as e:
        raise JobError(f"{where}: {e}") from None
    out = Path(job.output.path).resolve()
    if Path(cfg.path).resolve() == out:
        raise JobError(f"{where}: output.path: {job.output.path} is also the input file; choose another path")
    if not Path(cfg.path).is_file():  # (a glob or a directory: what it reaches)
        files = leave_out_own_files(job, files)
    return read_files(files, input_root(cfg.path))


def leave_out_own_files(job: JobConfig, files: list[Path]) -> list[Path]:
    """The input's files without the job's own output and checkpoint: a glob, `**` or a directory
    that covers them reads the same files at every run, before the output exists and after (said
    once on stderr when they lie where the input's expansion reaches)."""
    out, parts = Path(job.output.path).resolve(), job.parts_dir.resolve()
    kept = [f for f in files if f.resolve() != out and not (f.resolve().parent == parts and OWNED.fullmatch(f.name))]
    if any(f.resolve().is_relative_to(parts) for f in kept):
        return kept  # (a checkpoint.dir that holds an input file: refused by Checkpoint.check_place)
    probe = [out, parts / "plan.parquet"]
    if len(kept) < len(files) or any(_covers(job.input.path, p) for p in probe):
        print(
            f"komt-batch: input.path: {job.input.path} reaches the job's own output and checkpoint "
            f"({job.output.path}, {job.parts_dir}); they are left out of the input",
            file=sys.stderr,
            flush=True,
        )
    if not kept:
        raise JobError(f"{job.source}: input.path: {job.input.path} holds no input file besides the job's own output and checkpoint")
    return kept


def _covers(pattern: str, path: Path) -> bool:
    """Whether input.path (a file, directory or glob) would name `path` once it exists."""
    p = Path(pattern)
    if p.is_dir():  # its files, and those in key=value (partition) folders
        return path.is_relative_to(p.resolve()) and path.name.endswith(SUFFIXES) and all("=" in d for d in path.relative_to(p.resolve()).parts[:-1])
    if p.exists() or not glob.has_magic(pattern):
        return False
    return fnmatch.fnmatchcase(str(path), os.path.abspath(pattern).replace("/**/", "*/").replace("**", "*"))


def read_rows(job: JobConfig) -> Rows:
    where = job.source
    template = Template.parse(job.prompt.template, where)
    data = open_input(job)
    table = data.table
    if table.num_rows == 0:  # an empty input has no columns to speak of: give it the template's
        for name in [*template.fields, *([job.input.id_column] if job.input.id_column else [])]:
            if name not in table.column_names:
                table = table.append_column(name, pa.array([], pa.string()))
    template.check_columns(table.column_names, where)
    for name in [job.output.response_column, *GENERATED_COLUMNS]:
        if name in table.column_names:
            if name == job.output.response_column:
                raise JobError(f"{where}: output.response_column: the input already has a column {name!r}; choose another name for the responses")
            key, named = ("input.dataset", job.input.dataset) if job.input.dataset else ("input.path", job.input.path)
            raise JobError(f"{where}: {key}: {named} has a column {name!r}, one the output adds; rename it in the input")
    return Rows(data.files, table, row_ids(table, job.input.id_column, where, data.release, data.files), template, data.release)
