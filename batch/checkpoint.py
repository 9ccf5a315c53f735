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
      summary.json      the summary, written before the final file (so that a run stopped after
                        the final file can still write it beside the output: writer.finish_leftovers)
      plan.lock, shard-I-of-N.lock   flock locks (the job lock is beside the output: one per output)
      checkpoint.json   the proof that the directory is the job's: written first, with a random token
      .NAME.TOKEN-XXXXXXXX.tmp  a file of the names above being written (left behind only by a kill)

A file is the job's only if the job can prove it wrote it: the directory holds checkpoint.json (the
job wrote it when it made or first used the directory, empty), and the file has one of the names
above. Cleanup after the final file and --restart delete nothing else; a directory that holds
anything else, or files named like the job's without checkpoint.json, is refused before the job
starts. Every temporary file the job writes, here or beside the output, carries the token in its
name, and only such names are ever cleaned up (files only, never a folder's contents recursively).
A part records an HMAC of its rows, keyed by the token: a part edited by hand does not verify.

What is done is the set of rows in parts that verify: the file reads back whole (Parquet page
checksums), it is a result table of this plan (plan_id), and every row in it is a planned row
with the fingerprint the plan expects. A part that does not verify is set aside and its rows are
redone; its name says nothing about what it holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import stat
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.config import JobConfig
from batch.errors import JobError, WriteError, first_line
from batch.plan import Chunk
from batch.results import RESULT_SCHEMA

FORMAT = 3  # the manifest's format; 2 (results without stop_reason) and 1 (parts named by batch range) are not resumed
_OWNED_NAMES = (
    r"manifest\.json|plan\.parquet|settled\.parquet|part-[0-9a-z-]+\.parquet(\.rejected)?"
    r"|summary-shard-\d+-of-\d+\.json|summary\.json|job\.lock|plan\.lock|shard-\d+-of-\d+\.lock"
)
OWNED = re.compile(rf"({_OWNED_NAMES})|\.({_OWNED_NAMES})\.\w+(-\w+)?\.tmp")
MARKER = "checkpoint.json"  # written first into the directory: the proof that it is the job's
TOKEN = re.compile(r"[0-9a-f]{12}")
CLAIMING = re.compile(rf"\.{re.escape(MARKER)}\.[0-9a-f]{{12}}-claiming\.tmp")  # checkpoint.json being written (claim)
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


def temporary_prefix(path: Path, token: str) -> str:
    """The start of the name of a temporary file for `path` (mkstemp adds 8 characters and .tmp)."""
    return f".{path.name}.{token}-"


def write_atomic(path: Path, write, token: str) -> None:
    """Write a file via a temporary file in the same directory, fsync, rename, fsync the directory.

    The temporary file's name carries the checkpoint's token (remove_temporaries removes only such
    names). The file gets the user's umask (mkstemp alone would make it -rw-------). A failed write
    (a full disk) leaves no temporary file and raises WriteError."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path, token), suffix=".tmp", dir=path.parent)
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


def write_parquet_atomic(path: Path, table: pa.Table, token: str, metadata: dict[str, str] | None = None) -> None:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})

    def write(fh):
        pq.write_table(table, fh, compression="zstd", write_page_checksum=True)

    write_atomic(path, write, token)


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


def remove_temporaries(directory: Path, name: str, token: str) -> None:
    """Delete the temporary files of the file `name` (a regular expression of names) that a killed
    writer with this token left: `.<name>.<token>-XXXXXXXX.tmp` files, and the final file's sort
    folder `.<name>.<token>-XXXXXXXX.sort.tmp` (its run files, then the folder if that empties it).
    Nothing else: not another token's, not a folder's other contents, not through a link. Call it
    only while holding the lock under which such files are written: then none is being written."""
    if not directory.is_dir():
        return
    temporary = re.compile(rf"\.(?:{name})\.{re.escape(token)}-[a-z0-9_]{{8}}(\.sort)?\.tmp")
    for p in directory.iterdir():
        found = temporary.fullmatch(p.name)
        if not found:
            continue
        with contextlib.suppress(OSError):
            if p.is_symlink():
                continue
            if not found.group(1) and p.is_file():
                p.unlink()
            elif found.group(1) and p.is_dir():
                for run in p.iterdir():
                    if re.fullmatch(r"run-\d+\.arrow", run.name) and run.is_file() and not run.is_symlink():
                        run.unlink()
                p.rmdir()  # (fails, and keeps the folder, if anything else is in it)


def content_digest(table: pa.Table, token: str) -> str:
    """An HMAC of a result table's values, keyed by the checkpoint's token: recorded in a part when it
    is committed, checked whenever it is read, so that a part whose rows were edited does not
    verify. Computed from the values (lengths and bytes per column), not from how Arrow chunks them."""
    h = hmac.new(token.encode(), digestmod=hashlib.sha256)
    for name in RESULT_SCHEMA.names:
        column = table.column(name)
        h.update(name.encode() + b"\0")
        h.update(np.packbits(np.asarray(pc.is_valid(column).to_numpy(), bool)).tobytes())
        if pa.types.is_string(column.type):
            filled = column.fill_null("")
            h.update(np.asarray(pc.binary_length(filled).to_numpy(), np.int64).tobytes())
            for chunk in filled.chunks:
                if len(chunk) and chunk.buffers()[2] is not None:
                    offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
                    h.update(memoryview(chunk.buffers()[2])[int(offsets[0]) : int(offsets[-1])])
        else:
            h.update(np.asarray(column.fill_null(0).to_numpy(), np.int64).tobytes())
    return h.hexdigest()[:32]


class Busy(JobError):
    """A lock that another komt-batch process holds."""


def _lock_file(path: Path, mode: int) -> object:
    """Open `path` and flock it (mode, non-blocking: BlockingIOError when taken). The lock is held
    on the file that is at `path` now: one deleted and made anew meanwhile is opened again."""
    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, mode)
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino:
                    return fh
        except BaseException:
            fh.close()
            raise
        fh.close()


def _entries(directory: Path) -> list[Path]:
    """What is in a directory now (one that vanishes meanwhile holds nothing)."""
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


def _is_plain_file(p: Path) -> bool:
    """A regular file, not a link; one that vanished meanwhile counts as one (a run was removing it)."""
    try:
        st = p.lstat()
    except FileNotFoundError:
        return True
    return stat.S_ISREG(st.st_mode)


class Checkpoint:
    def __init__(self, directory: Path, output: Path | None = None):
        self.dir = Path(directory)
        self.output = Path(output) if output is not None else None
        self.manifest_path = self.dir / "manifest.json"
        self.plan_path = self.dir / "plan.parquet"
        self.settled_path = self.dir / "settled.parquet"
        self.marker_path = self.dir / MARKER
        self.summary_path = self.dir / "summary.json"
        self._part_token = uuid.uuid4().hex[:8]  # this process's parts: unique names whatever they hold
        self._seq = 0
        self._mark: dict | None = None

    @classmethod
    def of(cls, job: JobConfig) -> Checkpoint:
        return cls(job.parts_dir, Path(job.output.path))

    # --- its place, and the proof that it is the job's --------------------------------------------

    def mark(self, fresh: bool = False) -> dict | None:
        """checkpoint.json, if it is one the job wrote: {"token": ..., "made_dir": ..., "legacy_parts": [...]}
        (read once, or again when `fresh`: a run may have removed it meanwhile)."""
        if self._mark is None or fresh:
            self._mark = None
            try:
                mark = json.loads(self.marker_path.read_bytes())
            except (OSError, ValueError):
                return None
            if not (isinstance(mark, dict) and mark.get("komt_batch_checkpoint") == 1 and TOKEN.fullmatch(str(mark.get("token")))):
                return None
            self._mark = mark
        return self._mark

    @property
    def token(self) -> str:
        mark = self.mark()
        if mark is None:
            raise JobError(f"{self.dir}: not a checkpoint of this job (no {MARKER})")
        return mark["token"]

    def _legacy(self) -> bool:
        """A checkpoint of an earlier komt-batch version (no checkpoint.json): only the job's names,
        and a manifest that verifies (format 2 or this one, its plan_id its hash): nobody writes that by
        chance. A format-2 one is then reported as of another version, and `--restart` clears it."""
        entries = _entries(self.dir)
        if not entries or not all(OWNED.fullmatch(p.name) and _is_plain_file(p) for p in entries):
            return False
        try:
            manifest = json.loads(self.manifest_path.read_bytes())
            return manifest.get("format") in (2, FORMAT) and manifest.get("plan_id") == plan_id(manifest)
        except (OSError, ValueError, AttributeError):
            return False

    def check_place(self, job: JobConfig, inputs: list[Path]) -> None:
        """Refuse a checkpoint directory that holds what the job did not write, or the output or an
        input: cleanup deletes the directory's files, and only the job's own may be there. A
        directory without the job's checkpoint.json that holds anything (files named as the job's
        included) is not the job's."""
        where = f"{job.source}: checkpoint.dir: {self.dir}"
        here = self.dir.resolve()
        for what, path in [("the output", Path(job.output.path)), *(("the input file", f) for f in inputs)]:
            if path.resolve() == here or path.resolve().is_relative_to(here):
                raise JobError(f"{where}: it {'is' if path.resolve() == here else 'holds'} {what} {path}; choose a directory of its own")
        try:
            is_dir = stat.S_ISDIR(self.dir.stat().st_mode)
        except FileNotFoundError:
            return  # (none yet, or a finishing run just removed it)
        if not is_dir:
            raise JobError(f"{where}: it is a file, not a directory; move it or choose another checkpoint.dir")
        mark = self.mark()  # (before the listing: the job writes it first and deletes it last)
        entries = _entries(self.dir)
        if mark is not None or self._legacy():
            foreign = sorted(p.name for p in entries if p.name != MARKER and not ((OWNED.fullmatch(p.name) or CLAIMING.fullmatch(p.name)) and _is_plain_file(p)))
            why = ""
        else:
            foreign = sorted(p.name for p in entries if not CLAIMING.fullmatch(p.name))
            why = f" (it has no {MARKER} of a komt-batch job: it is not a checkpoint this job made)"
        if foreign:
            raise JobError(
                f"{where}: it holds files komt-batch did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}){why}; "
                "the checkpoint directory must be the job's alone: move them or choose another checkpoint.dir"
            )

    def claim(self) -> None:
        """Make the directory the job's: write checkpoint.json with a new random token into it (made
        now, or empty, or an earlier version's checkpoint), unless it has one. Call after check_place."""
        if self.mark() is not None:
            return
        made = not self.dir.exists()
        legacy = not made and self._legacy()
        mark = {"komt_batch_checkpoint": 1, "token": uuid.uuid4().hex[:12], "made_dir": made or legacy}
        if legacy:  # its parts have no content digest: they are verified as before, by row fingerprints
            mark["legacy_parts"] = sorted(p.name for p in self.dir.glob("part-*.parquet"))
        tmp = self.dir / f".{MARKER}.{mark['token']}-claiming.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as fh:
                fh.write(json.dumps(mark))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.marker_path)  # only if there is none: another process may claim it at once
            except FileExistsError:
                pass
        except OSError as e:
            raise WriteError(f"{self.marker_path}: cannot write: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        if self.mark() is None:
            raise JobError(f"{self.dir}: {MARKER} is not komt-batch's; move it or choose another checkpoint.dir")

    # --- locks -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, path: Path, mode: int, busy_message: str):
        """An OS file lock (flock): released by the kernel when the process dies, even by kill -9."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = _lock_file(path, mode)
        except BlockingIOError:
            raise Busy(busy_message) from None
        except OSError as e:
            raise WriteError(f"{path}: cannot write: {e.strerror or e}") from None
        try:
            yield fh
        finally:
            fh.close()

    @property
    def output_lock_path(self) -> Path:
        """The job lock: one per output (beside it), whatever checkpoint directory a run uses."""
        assert self.output is not None, "Checkpoint.of(job) knows its output"
        return self.output.with_name(f".{self.output.name}.lock")

    @contextlib.contextmanager
    def output_lock(self, exclusive: bool = True):
        """The output's lock alone (a finished output's leftovers are finished under it). Its last
        holder deletes the lock file when done (one that takes it exclusively then: no other holds
        it), so nothing is left beside the output; a process that opened it meanwhile opens the new one."""
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        busy = f"{self.output}: another komt-batch process is running this job" + ("" if exclusive else " unsharded, or merging it")
        with self._flock(self.output_lock_path, mode | fcntl.LOCK_NB, busy + "; wait for it or stop it first") as fh:
            try:
                yield fh
            finally:
                with contextlib.suppress(OSError):  # (BlockingIOError: other shards hold it still)
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self.output_lock_path.unlink()

    @contextlib.contextmanager
    def job_lock(self, shard: int, shards: int, restart: bool = False):
        """One lock per output, whatever the shard count or the checkpoint directory: an unsharded
        run (and merge) holds it exclusively, the shards of a sharded run share it and each holds
        its shard-I-of-N.lock, so the two modes exclude each other while shards run side by side.
        With restart, the plan and every part are deleted first, under the exclusive lock.
        Temporary files that a kill left behind are deleted: all of them under the exclusive lock,
        else this shard's own."""
        exclusive = shards == 1  # (merge takes it as an unsharded run does)
        with self.output_lock(exclusive or restart) as fh:
            self.claim()
            if restart:
                self.clear()
            if exclusive:
                remove_temporaries(self.dir, ".+", self.token)
                yield
                return
            if restart:
                self._share(fh, f"{self.output}: another komt-batch process is running this job unsharded, or merging it")
            with self._flock(
                self.dir / f"shard-{shard}-of-{shards}.lock",
                fcntl.LOCK_EX | fcntl.LOCK_NB,
                f"{self.dir}: another komt-batch process is running shard {shard}/{shards} of this job; wait for it or stop it first",
            ):
                remove_temporaries(self.dir, rf"part-{shard}-of-{shards}-[0-9a-z-]+\.parquet|summary-shard-{shard}-of-{shards}\.json", self.token)
                yield

    @staticmethod
    def _share(fh, busy: str) -> None:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(busy) from None

    def plan_lock(self):
        self.claim()
        return self._flock(self.dir / "plan.lock", fcntl.LOCK_EX, "")

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
            raise self.damaged(f"manifest.json is unreadable ({first_line(e)})") from None
        try:
            manifest = json.loads(data)
        except ValueError as e:  # (invalid UTF-8 included)
            raise self.damaged(f"manifest.json is not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise self.damaged("manifest.json is not a JSON object")
        if "format" not in manifest:
            raise self.damaged("manifest.json has no format (it is not komt-batch's, or it was emptied)")
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
            raise self.damaged(f"{path.name} is unreadable ({first_line(e)})") from None
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
        remove_temporaries(self.dir, "|".join(re.escape(name) for name in PLAN_FILES), self.token)
        tag = {"komt_batch_plan": manifest["plan_id"]}
        write_parquet_atomic(self.plan_path, rows, self.token, tag)
        write_parquet_atomic(self.settled_path, settled, self.token, tag)
        write_atomic(self.manifest_path, lambda fh: fh.write(json.dumps(manifest, indent=1, ensure_ascii=False).encode()), self.token)
        return StoredPlan(manifest, rows, [Chunk(**c) for c in manifest["chunks"]])  # what was just written, not read back

    def owned_files(self) -> list[Path]:
        """The job's files here: the job's names, regular files, in a directory with the job's
        checkpoint.json (none otherwise). The manifest first: a reader never finds a manifest whose
        plan is gone."""
        if self.mark() is None:
            return []
        files = [p for p in _entries(self.dir) if (OWNED.fullmatch(p.name) or CLAIMING.fullmatch(p.name)) and p.is_file() and not p.is_symlink()]
        return sorted(files, key=lambda p: p.name != "manifest.json")

    def remove(self) -> None:
        """Delete the job's own files, checkpoint.json last, then the directory if the job made it
        and nothing else is in it (after the final file)."""
        mark = self.mark()
        if mark is None:
            return
        for p in self.owned_files():
            p.unlink(missing_ok=True)
        self.marker_path.unlink(missing_ok=True)
        self._mark = None
        if mark.get("made_dir"):
            with contextlib.suppress(OSError):
                self.dir.rmdir()

    def clear(self) -> None:
        """Forget the plan and every part (--restart), whatever state they are in; the locks and
        checkpoint.json stay."""
        for p in self.owned_files():
            if p.suffix != ".lock":
                p.unlink(missing_ok=True)

    # --- parts -----------------------------------------------------------------------------------

    def write_part(self, plan: StoredPlan, shard: int, shards: int, table: pa.Table, stats: dict) -> Path:
        """Commit finished rows as a new part (a new name every time: nothing is overwritten)."""
        self._seq += 1
        path = self.dir / f"part-{shard}-of-{shards}-{self._seq:06d}-{self._part_token}.parquet"
        record = {"plan_id": plan.plan_id, "content": content_digest(table, self.token), **stats}
        write_parquet_atomic(path, table, self.token, {"komt_batch_part": json.dumps(record)})
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

    def _verify_part(self, path: Path, expected_id: str, positions: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, str | None]:
        none = np.zeros(0, np.int64)
        try:
            table = read_parquet_checked(path)
        except FileNotFoundError:
            return none, None  # set aside by another shard meanwhile
        except (OSError, pa.ArrowException) as e:
            return none, f"unreadable: {first_line(e)}"
        if not table.schema.equals(RESULT_SCHEMA, check_metadata=False):
            return none, "not a table of results"
        try:
            record = json.loads((table.schema.metadata or {}).get(b"komt_batch_part", b"{}"))
            part_plan = record.get("plan_id")
        except (ValueError, AttributeError):
            record, part_plan = {}, None
        if part_plan != expected_id:
            return none, f"of another plan ({part_plan or 'no plan_id'}; this plan is {expected_id})"
        mark = self.mark()
        if "content" not in record:  # parts of an earlier version's checkpoint, adopted by claim, have none
            if mark is not None and path.name not in mark.get("legacy_parts", ()):
                return none, "no record of its content (not committed by this job)"
        elif mark is None or record["content"] != content_digest(table, mark["token"]):
            return none, "its rows were edited since they were committed (the content does not match its record)"
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
        """A part's record (rows, completion_tokens, seconds); {} for one that vanished meanwhile."""
        try:
            meta = pq.read_schema(path).metadata or {}
        except (OSError, pa.ArrowException):
            return {}
        return json.loads(meta.get(b"komt_batch_part", b"{}"))

    def iter_results(self, done: Done, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Every committed result, a table at a time: each verified part's rows that `done` takes
        from it, then the settled rows in slices. One line per row over all of them. `columns`:
        only these (with "row")."""
        for k, path in enumerate(done.parts):
            try:
                t = read_parquet_checked(path, columns)
            except (OSError, pa.ArrowException) as e:
                raise self.damaged(f"{path.name} became unreadable ({first_line(e)}); run again to redo its rows") from None
            yield t.filter(pa.array(done.part_of[t.column("row").to_numpy()] == k))
        try:
            settled = pq.ParquetFile(self.settled_path, page_checksum_verification=True)
            for batch in settled.iter_batches(batch_size=SETTLED_SLICE, columns=columns):
                yield pa.Table.from_batches([batch])
        except (OSError, pa.ArrowException) as e:
            raise self.damaged(f"settled.parquet is unreadable ({first_line(e)})") from None
