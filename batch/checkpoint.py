"""The checkpoint directory: the stored plan, the committed parts, the locks -- and nothing else.

    <output>.parts/  (checkpoint.dir)
      manifest.json     the plan's identity (plan_id, a hash of the manifest itself), fingerprints
                        of the input, the settings and the model's files, the batches and chunks
      plan.parquet      one line per planned row: row, batch, chunk, prompt_tokens, the prompt
                        override and note of a truncated row, row_fingerprint (execution order)
      settled.parquet   rows settled at planning: errors (bad field, too long) and reused rows
      part-I-of-N-SEQ-TOKEN.parquet
                        finished rows, committed as they finish by shard I of N: result lines that
                        carry their own row and row_fingerprint, and the plan_id in the metadata
      part-*.parquet.rejected   a part set aside: damaged, or not of this plan
      summary-shard-I-of-N.json a finished shard's summary
      job.lock, plan.lock, shard-I-of-N.lock   flock locks
      .NAME.XXXXXXXX.tmp  a file of the names above being written (left behind only by a kill)

Only these names are the job's (`owned`): cleanup after the final file and --restart delete
nothing else, and a checkpoint directory that holds anything else is refused before the job starts.

What is done is the set of rows in parts that verify: the file reads back whole (Parquet page
checksums), it is a result table of this plan (plan_id), and every row in it is a planned row
with the fingerprint the plan expects. A part that does not verify is set aside and its rows are
redone; its name says nothing about what it holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch.config import JobConfig
from batch.errors import JobError, WriteError
from batch.plan import Chunk
from batch.results import RESULT_SCHEMA

FORMAT = 3  # the manifest's format; 2 (results without stop_reason) and 1 (parts named by batch range) are not resumed
_OWNED_NAMES = (
    r"manifest\.json|plan\.parquet|settled\.parquet|part-[0-9a-z-]+\.parquet(\.rejected)?"
    r"|summary-shard-\d+-of-\d+\.json|job\.lock|plan\.lock|shard-\d+-of-\d+\.lock"
)
OWNED = re.compile(rf"({_OWNED_NAMES})|\.({_OWNED_NAMES})\.\w+\.tmp")
SETTLED_SLICE = 65536  # settled rows read at a time
PLAN_FILES = ("manifest.json", "plan.parquet", "settled.parquet")
MANIFEST_FIELDS = ("format", "plan_id", "nonce", "created", "context", "planned_rows", "settled_rows", "reused_rows", "batch_sizes", "chunks", "input", "settings")
FINGERPRINT_CHARS = 32  # a row fingerprint: 32 hex characters (fingerprints.row_fingerprint)
PROGRESS_COLUMNS = ("row", "chunk", "row_fingerprint")  # what status and merge read of the plan
PLAN_COLUMNS = ("row", "batch", "chunk", "prompt_tokens", "prompt_override", "note", "row_fingerprint")


@dataclass
class StoredPlan:
    manifest: dict
    rows: pa.Table  # row, batch, chunk, prompt_tokens, prompt_override, note, row_fingerprint; in execution order
    chunks: list[Chunk] = field(default_factory=list)
    _fingerprints: np.ndarray | None = None

    @property
    def plan_id(self) -> str:
        return self.manifest["plan_id"]

    def positions(self) -> np.ndarray:
        """Each input row's position in the plan (-1: the row is not planned); 4 bytes a row."""
        pos = np.full(self.manifest["input"]["rows"], -1, np.int32 if self.rows.num_rows < 2**31 else np.int64)
        pos[self.rows.column("row").to_numpy()] = np.arange(self.rows.num_rows)
        return pos

    def fingerprints(self) -> np.ndarray:
        """The planned rows' fingerprints in plan order, 32 bytes each (numpy: no Python strings)."""
        if self._fingerprints is None:
            self._fingerprints = fixed_width(self.rows.column("row_fingerprint"), FINGERPRINT_CHARS)
            if self._fingerprints is None:
                raise JobError("plan.parquet: a row_fingerprint that is null or not of 32 characters")
        return self._fingerprints


def fixed_width(column: pa.ChunkedArray, width: int) -> np.ndarray | None:
    """A string column's values as a numpy array of `width` bytes each (one copy, read straight from
    the Arrow buffers); None when a value is null or of another length."""
    out = np.empty(len(column), f"S{width}")
    at = 0
    for chunk in column.chunks:
        n = len(chunk)
        if n == 0:
            continue
        if chunk.null_count or not pa.types.is_string(chunk.type):
            return None
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + n + 1]
        if (np.diff(offsets) != width).any():
            return None
        out[at : at + n] = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].view(f"S{width}")
        at += n
    return out


def fixed_width_strings(values: np.ndarray, chunk_rows: int = 1 << 20) -> pa.ChunkedArray:
    """fixed_width's inverse: numpy byte strings of one width as an Arrow string column, without a
    Python string per value (chunks of a million rows keep each chunk's 32-bit offsets in range)."""
    width = values.dtype.itemsize
    chunks = []
    for start in range(0, len(values), chunk_rows):
        part = np.ascontiguousarray(values[start : start + chunk_rows])
        offsets = np.arange(0, (len(part) + 1) * width, width, dtype=np.int32)
        chunks.append(pa.StringArray.from_buffers(len(part), pa.py_buffer(offsets), pa.py_buffer(part)))
    return pa.chunked_array(chunks, pa.string())


class Done:
    """The rows committed in verified parts: for each input row, the part that holds its result
    (-1: none), 4 bytes a row, not a dict of every row. `parts` lists only parts that hold a row."""

    def __init__(self, rows: int):
        self.parts: list[Path] = []
        self.part_of = np.full(rows, -1, np.int32)

    def add(self, path: Path, rows) -> None:
        """The part at `path` holds these rows; a row already held by another part keeps that one."""
        rows = np.asarray(rows, np.int64)
        new = rows[self.part_of[rows] < 0]
        if len(new):
            if not self.parts or self.parts[-1] != path:
                self.parts.append(path)
            self.part_of[new] = len(self.parts) - 1

    def __len__(self) -> int:
        return int(np.count_nonzero(self.part_of >= 0))

    def mask(self, rows: np.ndarray) -> np.ndarray:
        """Whether each of these rows is done."""
        return self.part_of[rows] >= 0


def plan_id(manifest: dict) -> str:
    """A hash of the manifest without its plan_id: the plan's identity, and a check of the manifest."""
    body = {k: v for k, v in manifest.items() if k != "plan_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


# --- writing files -------------------------------------------------------------------------------


def _umask() -> int:
    """The process's umask, read without changing it where /proc tells (os.umask sets it to read it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write) -> None:
    """Write a file via a temporary file in the same directory, fsync, rename, fsync the directory.

    The file gets the user's umask (mkstemp alone would make it -rw-------). A failed write (a full
    disk) leaves no temporary file and raises WriteError."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except OSError as e:
        raise WriteError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_parquet_atomic(path: Path, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})

    def write(fh):
        pq.write_table(table, fh, compression="zstd", write_page_checksum=True)

    write_atomic(path, write)


def read_parquet_checked(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a whole Parquet file, verifying page checksums; raises on any damage. A row group is
    decoded in slices, not whole (the plan of a large job is one file of millions of rows)."""
    with pq.ParquetFile(path, page_checksum_verification=True, pre_buffer=False, buffer_size=1 << 20) as f:
        full = f.schema_arrow
        missing = [c for c in columns or () if c not in full.names]
        if missing:
            raise pa.ArrowInvalid(f"no column {missing[0]!r}")
        schema = full if columns is None else pa.schema([full.field(c) for c in columns])
        batches = list(f.iter_batches(batch_size=65536, columns=columns, use_threads=False))
        return pa.Table.from_batches(batches, schema=schema.remove_metadata()).replace_schema_metadata(full.metadata)


def remove_temporaries(directory: Path, pattern: str) -> None:
    """Delete the temporary files (`.<pattern>.XXXXXXXX.tmp`, as write_atomic names them) that a
    killed writer left. Call it only while holding the lock under which such files are written:
    then none of them is being written."""
    for p in directory.glob(f".{pattern}.*.tmp") if directory.is_dir() else []:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)  # the final file's sort runs (row_order)
        else:
            p.unlink(missing_ok=True)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class Checkpoint:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.manifest_path = self.dir / "manifest.json"
        self.plan_path = self.dir / "plan.parquet"
        self.settled_path = self.dir / "settled.parquet"
        self._token = uuid.uuid4().hex[:8]  # this process's parts: unique names whatever they hold
        self._seq = 0

    # --- its place -------------------------------------------------------------------------------

    def check_place(self, job: JobConfig, inputs: list[Path]) -> None:
        """Refuse a checkpoint directory that holds what the job did not write, or the output or an
        input: cleanup deletes the directory's files, and only the job's own may be there."""
        where = f"{job.source}: checkpoint.dir: {self.dir}"
        here = self.dir.resolve()
        for what, path in [("the output", Path(job.output.path)), *(("the input file", f) for f in inputs)]:
            if path.resolve() == here or path.resolve().is_relative_to(here):
                raise JobError(f"{where}: it {'is' if path.resolve() == here else 'holds'} {what} {path}; choose a directory of its own")
        if not self.dir.exists():
            return
        if not self.dir.is_dir():
            raise JobError(f"{where}: it is a file, not a directory; move it or choose another checkpoint.dir")
        foreign = sorted(p.name for p in self.dir.iterdir() if not (OWNED.fullmatch(p.name) and p.is_file() and not p.is_symlink()))
        if foreign:
            raise JobError(
                f"{where}: it holds files komt-batch did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                "the checkpoint directory must be the job's alone: move them or choose another checkpoint.dir"
            )

    # --- locks -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int, busy_message: str):
        """An OS file lock (flock): released by the kernel when the process dies, even by kill -9."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fh = open(self.dir / name, "a+")
        except OSError as e:
            raise WriteError(f"{self.dir / name}: cannot write: {e.strerror or e}") from None
        try:
            try:
                fcntl.flock(fh, mode)
            except BlockingIOError:
                raise JobError(busy_message) from None
            yield fh
        finally:
            fh.close()

    @contextlib.contextmanager
    def job_lock(self, shard: int, shards: int, restart: bool = False):
        """One lock per output, whatever the shard count: an unsharded run (and merge) holds job.lock
        exclusively, the shards of a sharded run share it and each holds its shard-I-of-N.lock, so
        the two modes exclude each other while shards run side by side. With restart, the plan and
        every part are deleted first, under the exclusive lock. Temporary files that a kill left
        behind are deleted: all of them under the exclusive lock, else this shard's own."""
        exclusive = shards == 1  # (merge takes it as an unsharded run does)
        mode = fcntl.LOCK_EX if exclusive or restart else fcntl.LOCK_SH
        busy = f"{self.dir}: another komt-batch process is running this job" + (" unsharded, or merging it" if mode == fcntl.LOCK_SH else "")
        with self._flock("job.lock", mode | fcntl.LOCK_NB, busy + "; wait for it or stop it first") as fh:
            if restart:
                self.clear()
            if exclusive:
                remove_temporaries(self.dir, "*")
                yield
                return
            if restart:
                self._share(fh, busy)
            with self._flock(
                f"shard-{shard}-of-{shards}.lock",
                fcntl.LOCK_EX | fcntl.LOCK_NB,
                f"{self.dir}: another komt-batch process is running shard {shard}/{shards} of this job; wait for it or stop it first",
            ):
                remove_temporaries(self.dir, f"part-{shard}-of-{shards}-*.parquet")
                remove_temporaries(self.dir, f"summary-shard-{shard}-of-{shards}.json")
                yield

    @staticmethod
    def _share(fh, busy: str) -> None:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobError(busy) from None

    def plan_lock(self):
        return self._flock("plan.lock", fcntl.LOCK_EX, "")

    # --- the plan --------------------------------------------------------------------------------

    def damaged(self, what: str) -> JobError:
        return JobError(f"{self.dir}: the checkpoint is damaged: {what}. Run with --restart to start over (its committed rows are redone)")

    def load_plan(self, columns: tuple[str, ...] | None = None) -> StoredPlan | None:
        """The stored plan, verified; None without a manifest. Anything damaged raises one clear JobError.

        `columns`: only these of the plan's rows (merge and status need row, chunk, row_fingerprint)."""
        try:
            data = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self.damaged(f"manifest.json is unreadable ({_first_line(e)})") from None
        try:
            manifest = json.loads(data)
        except ValueError as e:  # (invalid UTF-8 included)
            raise self.damaged(f"manifest.json is not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise self.damaged("manifest.json is not a JSON object")
        if manifest.get("format") != FORMAT:
            raise self.damaged(f"manifest.json is of format {manifest.get('format')!r}, not {FORMAT} (another komt-batch version)")
        missing = [k for k in MANIFEST_FIELDS if k not in manifest]
        if missing:
            raise self.damaged(f"manifest.json lacks {', '.join(missing)}")
        if manifest["plan_id"] != plan_id(manifest):
            raise self.damaged("manifest.json does not match its plan_id (edited or corrupted)")
        try:
            chunks = [Chunk(**c) for c in manifest["chunks"]]
        except (TypeError, ValueError):
            raise self.damaged("manifest.json has malformed chunks") from None
        rows = self._read_plan_file(self.plan_path, manifest["plan_id"], columns)
        if rows.num_rows != manifest["planned_rows"] or any(c not in rows.column_names for c in columns or PLAN_COLUMNS):
            raise self.damaged("plan.parquet does not hold the manifest's planned rows")
        settled = self._plan_file_id(self.settled_path)
        if settled != manifest["plan_id"]:
            raise self.damaged(f"settled.parquet {'is missing or unreadable' if settled is None else 'belongs to another plan'}")
        plan = StoredPlan(manifest, rows, chunks)
        if columns == PROGRESS_COLUMNS:  # status and merge: the fingerprints as numpy only, not also as strings
            plan.fingerprints()
            plan.rows = rows.drop_columns(["row_fingerprint"])
        return plan

    def _read_plan_file(self, path: Path, expected_id: str, columns: tuple[str, ...] | None) -> pa.Table:
        try:
            table = read_parquet_checked(path, list(columns) if columns else None)
        except FileNotFoundError:
            raise self.damaged(f"{path.name} is missing") from None
        except (OSError, pa.ArrowException) as e:
            raise self.damaged(f"{path.name} is unreadable ({_first_line(e)})") from None
        if (table.schema.metadata or {}).get(b"komt_batch_plan", b"").decode() != expected_id:
            raise self.damaged(f"{path.name} belongs to another plan")
        return table

    @staticmethod
    def _plan_file_id(path: Path) -> str | None:
        try:
            return (pq.read_schema(path).metadata or {}).get(b"komt_batch_plan", b"").decode()
        except (OSError, pa.ArrowException):
            return None

    def store_plan(self, manifest: dict, rows: pa.Table, settled: pa.Table) -> StoredPlan:
        """Write a new plan under a new identity; the manifest goes last, so a plan without its
        manifest is never read (and parts of any earlier plan are never adopted: their plan_id differs)."""
        manifest = {**manifest, "format": FORMAT, "nonce": uuid.uuid4().hex}
        manifest["plan_id"] = plan_id(manifest)
        for name in PLAN_FILES:
            remove_temporaries(self.dir, name)
        tag = {"komt_batch_plan": manifest["plan_id"]}
        write_parquet_atomic(self.plan_path, rows, tag)
        write_parquet_atomic(self.settled_path, settled, tag)
        write_atomic(self.manifest_path, lambda fh: fh.write(json.dumps(manifest, indent=1, ensure_ascii=False).encode()))
        return StoredPlan(manifest, rows, [Chunk(**c) for c in manifest["chunks"]])  # what was just written, not read back

    def owned_files(self) -> list[Path]:
        return [p for p in self.dir.iterdir() if OWNED.fullmatch(p.name) and p.is_file()] if self.dir.is_dir() else []

    def remove(self) -> None:
        """Delete the job's own files and, if nothing else is left, the directory (after the final file)."""
        for p in self.owned_files():
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()

    def clear(self) -> None:
        """Forget the plan and every part (--restart), whatever state they are in; the locks stay."""
        for p in self.owned_files():
            if p.suffix != ".lock":
                p.unlink(missing_ok=True)

    # --- parts -----------------------------------------------------------------------------------

    def write_part(self, plan: StoredPlan, shard: int, shards: int, table: pa.Table, stats: dict) -> Path:
        """Commit finished rows as a new part (a new name every time: nothing is overwritten)."""
        self._seq += 1
        path = self.dir / f"part-{shard}-of-{shards}-{self._seq:06d}-{self._token}.parquet"
        write_parquet_atomic(path, table, {"komt_batch_part": json.dumps({"plan_id": plan.plan_id, **stats})})
        return path

    def done_rows(self, plan: StoredPlan, set_aside: bool = True) -> tuple[Done, list[str]]:
        """(the rows committed in parts that verify, the parts that do not verify and why).

        A part that does not verify is set aside (renamed *.rejected, said on stderr) and its rows
        are redone; with set_aside False (status: it only reads) it is skipped."""
        positions, expected = plan.positions(), plan.fingerprints()
        done = Done(len(positions))
        bad = []
        for path in sorted(self.dir.glob("part-*.parquet")):
            rows, problem = self._verify_part(path, plan.plan_id, positions, expected)
            if problem is None:
                done.add(path, rows)  # a row in two parts (two runs of one shard) is taken once
                continue
            bad.append(f"{path.name}: {problem}")
            if set_aside:
                with contextlib.suppress(FileNotFoundError):  # another shard may have set it aside first
                    os.replace(path, path.with_name(path.name + ".rejected"))
                print(f"komt-batch: set aside {path.name} ({problem}); its rows will be redone", file=sys.stderr, flush=True)
        return done, bad

    @staticmethod
    def _verify_part(path: Path, expected_id: str, positions: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, str | None]:
        none = np.zeros(0, np.int64)
        try:
            table = read_parquet_checked(path)
        except FileNotFoundError:
            return none, None  # set aside by another shard meanwhile
        except (OSError, pa.ArrowException) as e:
            return none, f"unreadable: {_first_line(e)}"
        if not table.schema.equals(RESULT_SCHEMA, check_metadata=False):
            return none, "not a table of results"
        try:
            part_plan = json.loads((table.schema.metadata or {}).get(b"komt_batch_part", b"{}")).get("plan_id")
        except (ValueError, AttributeError):
            part_plan = None
        if part_plan != expected_id:
            return none, f"of another plan ({part_plan or 'no plan_id'}; this plan is {expected_id})"
        if table.num_rows == 0:
            return none, None
        column = table.column("row")
        if column.null_count:
            return none, "rows outside this plan"
        rows = column.to_numpy()
        if rows.min() < 0 or rows.max() >= len(positions):
            return none, "rows outside this plan"
        if len(np.unique(rows)) != len(rows):
            return none, "a row twice"
        at = positions[rows]
        fps = fixed_width(table.column("row_fingerprint"), FINGERPRINT_CHARS)
        same = (at >= 0) & (expected[np.maximum(at, 0)] == fps) if fps is not None else np.zeros(len(rows), bool)
        if not same.all():
            return none, f"rows that are not this plan's (row {int(rows[~same][0])}'s fingerprint differs)"
        return rows, None

    @staticmethod
    def part_stats(path: Path) -> dict:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta.get(b"komt_batch_part", b"{}"))

    def iter_results(self, done: Done, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Every committed result, a table at a time: each verified part's rows that `done` takes
        from it, then the settled rows in slices. One line per row over all of them. `columns`:
        only these (with "row")."""
        for k, path in enumerate(done.parts):
            try:
                t = read_parquet_checked(path, columns)
            except (OSError, pa.ArrowException) as e:
                raise self.damaged(f"{path.name} became unreadable ({_first_line(e)}); run again to redo its rows") from None
            yield t.filter(pa.array(done.part_of[t.column("row").to_numpy()] == k))
        try:
            settled = pq.ParquetFile(self.settled_path, page_checksum_verification=True)
            for batch in settled.iter_batches(batch_size=SETTLED_SLICE, columns=columns):
                yield pa.Table.from_batches([batch])
        except (OSError, pa.ArrowException) as e:
            raise self.damaged(f"settled.parquet is unreadable ({_first_line(e)})") from None
