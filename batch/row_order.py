"""Result tables in any order -> results in input order, in bounded memory (an external sort by row).

Parts hold rows in the order they finished (planned by prompt length), so every part spans the
whole input. The tables are gathered up to `run_bytes`, sorted by row and spilled as a run (an
Arrow IPC file in a temporary folder, memory-mapped to read back); then `take(a, b)` gives rows
a..b-1 by cutting the matching slice from each run, range after range. What a process holds is one
run being gathered, then one range: never every generated column at once. A job whose results fit
in one run spills nothing.
"""

from __future__ import annotations

import mmap
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.errors import IncompleteError, WriteError

RUN_BYTES = 64 << 20


class RowOrder:
    def __init__(self, rows: int, folder: Path, prefix: str, run_bytes: int | None = None):
        self.rows, self.folder, self.prefix = rows, folder, prefix
        self.run_bytes = RUN_BYTES if run_bytes is None else run_bytes
        self.seen = np.zeros(rows, np.uint8)  # 0: no result yet, 1: one, 2: more than one
        self.gathered: list[pa.Table] = []
        self.gathered_bytes = 0
        self.total_bytes = 0
        self.spill: Path | None = None
        self.runs: list[tuple[pa.Table, np.ndarray, list[int]]] = []  # (run, its rows, [cursor])
        self.maps: list[mmap.mmap] = []

    def __enter__(self) -> RowOrder:
        return self

    def __exit__(self, *exc) -> None:
        self.runs.clear()
        self.maps.clear()  # unmapped when the last table over them goes (Linux deletes mapped files fine)
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
            self._add_run(self._sorted(self.gathered))
            self.gathered = []
        pieces = []
        for run, rows, cursor in self.runs:
            end = int(np.searchsorted(rows, b, side="left"))
            if end > cursor[0]:
                pieces.append(run.slice(cursor[0], end - cursor[0]))
            cursor[0] = end
        out = self._sorted(pieces) if pieces else None
        if out is None or out.num_rows != b - a:
            raise IncompleteError(f"rows {a}..{b - 1}: {0 if out is None else out.num_rows} results for {b - a} rows")
        return out

    def release(self) -> None:
        """Drop the pages of the runs read so far from this process's memory (they stay on disk)."""
        for m in self.maps:
            m.madvise(mmap.MADV_DONTNEED)

    @staticmethod
    def _sorted(tables: list[pa.Table]) -> pa.Table:
        table = pa.concat_tables(tables).combine_chunks()
        return table.take(pc.sort_indices(table.column("row")))

    def _add_run(self, run: pa.Table) -> None:
        rows = run.column("row")
        self.runs.append((run, rows.chunk(0).to_numpy() if rows.num_chunks == 1 else rows.to_numpy(), [0]))

    def _spill_run(self) -> None:
        run = self._sorted(self.gathered)
        self.gathered, self.gathered_bytes = [], 0
        try:
            if self.spill is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.spill = Path(tempfile.mkdtemp(prefix=self.prefix, suffix=".sort.tmp", dir=self.folder))
            path = self.spill / f"run-{len(self.maps):05d}.arrow"
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, run.schema) as writer:
                writer.write_table(run)  # one batch: read back zero-copy
            del run
            with open(path, "rb") as fh:
                m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:  # (pyarrow's IOError included): a full disk, above all
            raise WriteError(f"{self.spill or self.folder}: cannot write the final file's sort runs: {e.strerror or e}") from None
        self.maps.append(m)
        self._add_run(pa.ipc.open_file(pa.BufferReader(pa.py_buffer(m))).read_all())
