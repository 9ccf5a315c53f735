"""Result tables in any order -> results in input order, in bounded memory (an external sort by row).

Parts hold rows in the order they finished (planned by prompt length), so every part spans the
whole input. The tables are gathered up to `run_bytes`, sorted by row and spilled as a run (an
Arrow IPC file of RUN_BATCH_ROWS-row batches in a temporary folder); then `take(a, b)` gives rows
a..b-1 by cutting the matching rows from each run, range after range, reading each run a batch at a
time. What a process holds is one run being gathered, then one range and one batch per run: never
every generated column at once. A job whose results fit in one run spills nothing.

Runs are read with plain reads, not memory-mapped: here every region a mapping touches brings about
2 MB into the process's resident memory (measured), and a range touches every run.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.errors import IncompleteError, WriteError

RUN_BYTES = 64 << 20
RUN_BATCH_ROWS = 512  # a run is read this many rows at a time: one batch per run is held


class _Run:
    """A run sorted by row, read forward a batch at a time: spilled (batches read from its file as
    needed) or the last one, kept in memory."""

    def __init__(self, get_batch: Callable[[int], pa.RecordBatch], batches: int):
        self.get_batch, self.batches = get_batch, batches
        self.index, self.batch, self.offset = -1, None, 0

    @classmethod
    def spilled(cls, path: Path) -> _Run:
        reader = pa.ipc.open_file(pa.OSFile(str(path)))
        return cls(reader.get_batch, reader.num_record_batches)

    @classmethod
    def in_memory(cls, table: pa.Table) -> _Run:
        batches = table.to_batches(max_chunksize=RUN_BATCH_ROWS)
        return cls(batches.__getitem__, len(batches))

    def take_below(self, b: int) -> list[pa.RecordBatch]:
        """Its next rows that are < b."""
        pieces = []
        while True:
            if self.batch is None or self.offset == self.batch.num_rows:
                if self.index + 1 >= self.batches:
                    return pieces
                self.index += 1
                self.batch, self.offset = self.get_batch(self.index), 0
            rows = self.batch.column(0).to_numpy()
            end = int(np.searchsorted(rows, b, side="left"))
            if end > self.offset:
                pieces.append(self.batch.slice(self.offset, end - self.offset))
            self.offset = max(end, self.offset)
            if self.offset < self.batch.num_rows:
                return pieces


class RowOrder:
    def __init__(self, rows: int, folder: Path, prefix: str, run_bytes: int | None = None):
        self.rows, self.folder, self.prefix = rows, folder, prefix
        self.run_bytes = RUN_BYTES if run_bytes is None else run_bytes
        self.seen = np.zeros(rows, np.uint8)  # 0: no result yet, 1: one, 2: more than one
        self.gathered: list[pa.Table] = []
        self.gathered_bytes = 0
        self.total_bytes = 0
        self.spill: Path | None = None
        self.runs: list[_Run] = []

    def __enter__(self) -> RowOrder:
        return self

    def __exit__(self, *exc) -> None:
        self.runs.clear()
        if self.spill is not None:
            shutil.rmtree(self.spill, ignore_errors=True)

    def add(self, table: pa.Table) -> None:
        rows = table.column("row").to_numpy()
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            raise IncompleteError(f"a result for row {int(rows.max())} outside the input's {self.rows} rows")
        unique = np.unique(rows)
        if len(unique) != len(rows):
            twice = unique[np.flatnonzero(np.bincount(np.searchsorted(unique, rows)) > 1)]
            raise IncompleteError(f"rows with more than one result (e.g. rows {twice[:5].tolist()})")
        self.seen[rows] = np.minimum(self.seen[rows], 1) + 1  # 1: once, 2: more
        self.gathered.append(table)
        self.gathered_bytes += table.nbytes
        self.total_bytes += table.nbytes
        if self.gathered_bytes >= self.run_bytes:
            self._spill_run()

    def check_complete(self, where: str) -> None:
        """Every row has exactly one result, else IncompleteError naming some of the others."""
        missing = np.flatnonzero(self.seen == 0)
        if len(missing):
            raise IncompleteError(f"{where}: {len(missing)} of {self.rows} rows have no result yet (e.g. rows {missing[:5].tolist()})")
        twice = np.flatnonzero(self.seen > 1)
        if len(twice):
            raise IncompleteError(f"{where}: {len(twice)} rows have more than one result (e.g. rows {twice[:5].tolist()})")

    def bytes_per_row(self) -> float:
        return self.total_bytes / max(self.rows, 1)

    def take(self, a: int, b: int) -> pa.Table:
        """The results of rows a..b-1, in row order (call with consecutive ranges)."""
        if self.gathered:  # the last run (all of them when they fit in one) stays in memory
            self.runs.append(_Run.in_memory(self._sorted(self.gathered)))
            self.gathered = []
        pieces = [pa.Table.from_batches([p]) for run in self.runs for p in run.take_below(b)]
        out = self._sorted(pieces) if pieces else None
        if out is None or out.num_rows != b - a:
            raise IncompleteError(f"rows {a}..{b - 1}: {0 if out is None else out.num_rows} results for {b - a} rows")
        return out

    @staticmethod
    def _sorted(tables: list[pa.Table]) -> pa.Table:
        table = pa.concat_tables(tables).combine_chunks()
        return table.take(pc.sort_indices(table.column("row")))

    def _spill_run(self) -> None:
        run = self._sorted(self.gathered)
        self.gathered, self.gathered_bytes = [], 0
        try:
            if self.spill is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.spill = Path(tempfile.mkdtemp(prefix=self.prefix, suffix=".sort.tmp", dir=self.folder))
            path = self.spill / f"run-{len(self.runs):05d}.arrow"
            self._write_run(path, run)
            del run
            self.runs.append(_Run.spilled(path))
        except OSError as e:  # (pyarrow's IOError included): a full disk, above all
            raise WriteError(f"{self.spill or self.folder}: cannot write the final file's sort runs: {e.strerror or e}") from None

    @staticmethod
    def _write_run(path: Path, run: pa.Table) -> None:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, run.schema) as writer:
            writer.write_table(run, max_chunksize=RUN_BATCH_ROWS)
