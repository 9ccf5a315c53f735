"""The checkpoint directory: the stored plan, fingerprints, committed parts, and the locks.

    <output>.parts/
      manifest.json    fingerprints of the input and of the output-changing settings, the chunks
      plan.parquet     one line per planned row: row, batch, chunk, prompt_tokens (execution order)
      settled.parquet  rows settled at planning: errors (bad field, too long) and rows reused from earlier outputs
      part-B1-B2.parquet  the results of batches B1..B2 (one chunk's or part of one)
      shard-I-of-N.lock   held (flock) by the process running that shard

What is left is a directory listing: a batch is done when a valid part covers it. Parts are written
atomically (temporary file, fsync, rename) with Parquet page checksums; a part that does not read
back whole, with the rows its name promises, is deleted and redone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch.errors import JobError
from batch.plan import Chunk
from batch.results import RESULT_SCHEMA

PART_RE = re.compile(r"^part-(\d{7})-(\d{7})\.parquet$")


@dataclass
class StoredPlan:
    manifest: dict
    rows: pa.Table  # row, batch, chunk, prompt_tokens, in execution order
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def num_batches(self) -> int:
        return self.chunks[-1].last_batch + 1 if self.chunks else 0

    def batch_rows(self) -> list[list[int]]:
        """Row indices of each batch, in execution order."""
        out: list[list[int]] = [[] for _ in range(self.num_batches)]
        for row, b in zip(self.rows.column("row").to_pylist(), self.rows.column("batch").to_pylist()):
            out[b].append(row)
        return out


def write_atomic(path: Path, write) -> None:
    """Write a file via a temporary file in the same directory, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def write_parquet_atomic(path: Path, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})

    def write(fh):
        pq.write_table(table, fh, compression="zstd", write_page_checksum=True)

    write_atomic(path, write)


def read_parquet_checked(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a whole Parquet file, verifying page checksums; raises on any damage."""
    return pq.read_table(path, columns=columns, page_checksum_verification=True)


class Checkpoint:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.manifest_path = self.dir / "manifest.json"
        self.plan_path = self.dir / "plan.parquet"
        self.settled_path = self.dir / "settled.parquet"

    # --- locks -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, wait: bool, busy_message: str):
        """An OS file lock (flock): released by the kernel when the process dies, even by kill -9."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.dir / name, "a+")
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise JobError(busy_message) from None
            fh.seek(0), fh.truncate(), fh.write(f"{os.getpid()}\n"), fh.flush()
            yield
        finally:
            fh.close()

    def shard_lock(self, shard: int, shards: int):
        return self.lock(
            f"shard-{shard}-of-{shards}.lock",
            wait=False,
            busy_message=f"{self.dir}: another komt-batch process is running shard {shard}/{shards} of this job "
            f"(lock shard-{shard}-of-{shards}.lock); wait for it or stop it first",
        )

    def plan_lock(self):
        return self.lock("plan.lock", wait=True, busy_message="")

    # --- the plan --------------------------------------------------------------------------------

    def load_plan(self) -> StoredPlan | None:
        if not self.manifest_path.exists():
            return None
        manifest = json.loads(self.manifest_path.read_text())
        rows = read_parquet_checked(self.plan_path)
        chunks = [Chunk(**c) for c in manifest["chunks"]]
        return StoredPlan(manifest, rows, chunks)

    def store_plan(self, manifest: dict, rows: pa.Table, settled: pa.Table) -> None:
        """Write the plan; the manifest goes last, so a plan without its manifest is never read."""
        write_parquet_atomic(self.plan_path, rows)
        write_parquet_atomic(self.settled_path, settled)
        write_atomic(self.manifest_path, lambda fh: fh.write(json.dumps(manifest, indent=1, ensure_ascii=False).encode()))

    def remove(self) -> None:
        """Delete the checkpoint directory (after the final file is written)."""
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()

    def clear(self) -> None:
        """Forget the plan and every part (for --restart); locks stay."""
        for p in self.dir.iterdir() if self.dir.exists() else []:
            if p.suffix in (".parquet", ".json", ".tmp"):
                p.unlink()

    # --- parts -----------------------------------------------------------------------------------

    @staticmethod
    def part_name(first_batch: int, last_batch: int) -> str:
        return f"part-{first_batch:07d}-{last_batch:07d}.parquet"

    def write_part(self, first_batch: int, last_batch: int, table: pa.Table, stats: dict) -> Path:
        path = self.dir / self.part_name(first_batch, last_batch)
        write_parquet_atomic(path, table, {"komt_batch_part": json.dumps(stats)})
        return path

    def part_files(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in sorted(self.dir.glob("part-*.parquet")):
            m = PART_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), p))
        return out

    def done_batches(self, plan: StoredPlan, verify: bool = True) -> dict[int, Path]:
        """batch -> the part that holds it. With verify, damaged parts are deleted (to be redone)."""
        sizes = plan.manifest["batch_sizes"]
        done: dict[int, Path] = {}
        for first, last, path in self.part_files():
            expected = sum(sizes[first : last + 1]) if last < len(sizes) else -1
            if verify and not self._part_is_whole(path, expected):
                path.unlink(missing_ok=True)
                continue
            for b in range(first, last + 1):
                done.setdefault(b, path)
        return done

    @staticmethod
    def _part_is_whole(path: Path, expected_rows: int) -> bool:
        try:
            table = read_parquet_checked(path)
        except (OSError, pa.ArrowException):
            return False
        return table.num_rows == expected_rows and table.schema.equals(RESULT_SCHEMA, check_metadata=False)

    @staticmethod
    def part_stats(path: Path) -> dict:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta.get(b"komt_batch_part", b"{}"))

    def read_results(self, plan: StoredPlan) -> pa.Table:
        """Every committed result (parts and settled rows), one line per row."""
        done = self.done_batches(plan, verify=False)
        tables = []
        for path in sorted(set(done.values())):
            t = read_parquet_checked(path)
            keep = pa.array([done.get(b) == path for b in t.column("batch").to_pylist()], pa.bool_())
            tables.append(t.filter(keep))  # a batch held by two overlapping parts is taken once
        tables.append(read_parquet_checked(self.settled_path))
        return pa.concat_tables(tables)  # never empty: settled.parquet is always there
