"""Input files (.jsonl, .jsonl.gz, .parquet; a glob; a directory) -> one Arrow stream file, read
memory-mapped, so that no process holds the input in memory (the final file repeats every input
column in input order, so the input must stay at hand, not in RAM).

The files are converted once, streaming, into an Arrow stream file in the input cache
($XDG_CACHE_HOME/komt-batch/inputs, default ~/.cache), named by the files' paths, sizes and times:
`validate`, `run` and every shard of a job find it there and only map it. A file changed in the
last two seconds may change again within its timestamp's tick: its conversion is used by this
process only. Entries unused for CACHE_DAYS days are removed.

Every value arrives as it was, or the input is refused (JobError naming the file, the column and,
for JSONL, the line):

- the columns are the union of all rows' (and files') keys, in order of first appearance, with nulls
  where a row lacks one;
- a JSONL column takes the one type that holds every value unchanged: integers -> int64, decimals
  (with integers up to 2**53 among them) -> float64, true/false -> bool, strings -> string, lists ->
  list of their items' type, objects -> struct of the union of their keys. Anything else (true/false
  among numbers, strings among numbers, integers beyond 2**53 among decimals, integers beyond 64
  bits, a decimal beyond float64's range, a key twice in one object, a lone surrogate escape) is
  refused at its line;
- files whose types differ are joined only where no value changes (int32 + int64, int64 + float64
  up to 2**53, a column of nulls + anything); otherwise refused naming the file and the column;
- objects that have no keys yet are an empty struct until keys come, on a later line or in a later
  file: the joined type is the same however the input is split into files and batches. What the
  output Parquet file could not hold, or not be read back from, is refused (check_storable): a
  column whose objects never get a key, and lists and objects nested deeper than pyarrow, pandas
  and `datasets` read back;
- an input file whose name is not UTF-8 is refused (the plan records the names);
- a directory's `key=value` folders (Hive partitions) add the column `key` with the string `value`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import gzip
import hashlib
import json
import mmap
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from batch.config import is_utf8, shown_name
from batch.errors import JobError, WriteError, first_line

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
KINDS = ".jsonl, .jsonl.gz or .parquet"
_JSONL_BATCH = 4096  # lines parsed into one Arrow batch: bounds the Python objects alive at once
_PARQUET_BATCH = 8192  # rows decoded at a time while converting a Parquet file
_PARQUET_BUFFER = 1 << 20  # read a column chunk in pieces this size, not whole (a row group can hold millions of rows)
_PARTITION = re.compile(r"^([^=]+)=(.*)$")  # a Hive partition folder: key=value
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # how Hive, Spark and pyarrow write a null partition value
_CACHE_FORMAT = 1  # part of every cache key: a change in how files are converted makes new entries
CACHE_DAYS = 3  # a cache entry unused this long is removed (nightly inputs are new files every night)
FRESH_NS = 2_000_000_000  # a file changed this recently may change again within its mtime's tick


def input_files(path: str) -> list[Path]:
    """The files named by input.path, sorted, so that row positions are stable.

    A path that exists is taken as named, even when it looks like a glob (`prompts[v2].jsonl`)."""
    files = _named_files(path)
    for f in files:
        real = str(f.resolve())  # (what the plan records: a link's target, a relative path's folder)
        if not is_utf8(real):
            raise JobError(f"input.path: {shown_name(real)}: the file's name is not UTF-8 text (the checkpoint records it); rename the file")
    return files


def _named_files(path: str) -> list[Path]:
    p = Path(path)
    if not p.exists() and glob.has_magic(path):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if f.endswith(SUFFIXES))
        if not files:
            raise JobError(f"input.path: the glob {path!r} matches no {KINDS} file")
        return files
    if p.is_dir():
        files = sorted(_listing(p))
        if not files:
            raise JobError(f"input.path: the directory {path} holds no {KINDS} file")
        return files
    if not p.exists():
        raise JobError(f"input.path: {path}: no such file")
    if not p.name.endswith(SUFFIXES):
        raise JobError(f"input.path: {path}: expected a {KINDS} file")
    return [p]


def _listing(directory: Path):
    """The directory's input files, and those in its `key=value` (Hive partition) folders."""
    for f in directory.iterdir():
        if f.is_dir() and _PARTITION.match(f.name):
            yield from _listing(f)
        elif f.name.endswith(SUFFIXES) and f.is_file():
            yield f


def row_places(files: list[Path], positions: list[int]) -> list[str]:
    """Where rows of the joined input lie in its files (positions 0-based, in file order then row
    order, as read_files joins them): `FILE:LINE` in JSONL (blank lines are no rows, as the reader
    skips them), `FILE row N` (1-based) in Parquet and Arrow. For messages: it reads the files again,
    up to the last position asked for."""
    wanted, found, start = set(positions), {}, 0
    try:
        for f in files:
            if start > max(wanted, default=-1):
                break
            if f.name.endswith((".jsonl", ".jsonl.gz")):
                row = start
                with (gzip.open if f.name.endswith(".gz") else open)(f, "rb") as fh:
                    for lineno, raw in enumerate(fh, 1):
                        if _is_row(raw.decode("utf-8", "replace")):
                            if row in wanted:
                                found[row] = f"{f}:{lineno}"
                            row += 1
                start = row
                continue
            if f.name.endswith(".parquet"):
                count = pq.ParquetFile(f).metadata.num_rows
            else:  # a dataset's Arrow stream
                with pa.memory_map(str(f)) as source:
                    count = pa.ipc.open_stream(source).read_all().num_rows
            found.update({r: f"{f} row {r - start + 1}" for r in wanted if start <= r < start + count})
            start += count
    except (OSError, EOFError, zlib.error, pa.ArrowException):  # (a file changed or gone since it was read: positions then)
        pass
    return [found.get(r, f"row {r + 1} of the input") for r in positions]


def input_root(path: str) -> Path | None:
    """Where Hive partition folders start: the input directory, or a glob's fixed leading folders."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists() or not glob.has_magic(path):
        return None
    fixed = []
    for part in p.parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")



@dataclass
class MappedInput:
    """The input as one Arrow table over memory-mapped Arrow files.

    Pages read through a mapping count as the process's resident memory until they are unmapped;
    release() drops them (they stay in the page cache), so a scan reads a slice, then releases."""

    files: list[Path]  # the files the user named (or the dataset's Arrow files): what fingerprints and checks see
    table: pa.Table
    maps: list[mmap.mmap]

    def release(self) -> None:
        for m in self.maps:
            m.madvise(mmap.MADV_DONTNEED)  # read-only mappings: the pages come back from the file when read again


def open_arrow(files: list[Path], arrow_files: list[Path]) -> MappedInput:
    """Map Arrow stream files (ours, or a `datasets` cache's) and join them, zero-copy, into one table."""
    tables, maps = [], []
    for path in arrow_files:
        try:
            with open(path, "rb") as fh:
                m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(fh.fileno()).st_size else None
            if m is None:
                raise JobError(f"{path}: not a readable Arrow file (it is empty)")
            tables.append(pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(m))).read_all())
        except (OSError, pa.ArrowException) as e:
            if "recursion depth" in str(e):  # Arrow reads at most 64 levels of nested types
                raise JobError(f"{path}: lists or objects nested too deeply for the output ({_DEPTH_LIMITS})") from None
            raise JobError(f"{path}: not a readable Arrow file ({first_line(e)})") from None
        check_storable(tables[-1].schema, lambda column: path)
        maps.append(m)
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    except pa.ArrowInvalid as e:
        raise JobError(f"{arrow_files[0].parent}: its Arrow files have different columns ({first_line(e)})") from None
    return MappedInput(files, table, maps)


def read_files(files: list[Path], root: Path | None = None) -> MappedInput:
    """All rows of all files, in file order then row order, as one memory-mapped table (columns: the union)."""
    cache = _cache_dir()
    stamps = [_stamp(f) for f in files]
    key = json.dumps([_CACHE_FORMAT, str(root.resolve()) if root else None, stamps])
    entry = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.arrow"
    with _writing_cache(cache):
        if time.time_ns() - max((max(s[3], s[4]) for s in stamps), default=0) < FRESH_NS:
            return _read_once(files, root, cache)
        with _locked(entry.with_suffix(".lock")):  # shards starting together: one converts, the others wait
            if not entry.exists():
                _convert_atomic(files, root, entry)
                _evict(cache, keep=entry)
        os.utime(entry)  # its mtime says when it was last used (eviction)
    return open_arrow(files, [entry])


@contextlib.contextmanager
def _writing_cache(cache: Path):
    """A failed write into the input cache (a full disk, a quota) is one line and exit 74, not a
    traceback; the conversion's temporary files are gone already. (Reading the inputs raises JobError.)"""
    try:
        yield
    except OSError as e:
        raise WriteError(
            f"cannot write the input cache {cache} ({e.strerror or first_line(e)}): it needs about the input's size "
            "uncompressed, in Arrow; free space there or set XDG_CACHE_HOME to a folder with room"
        ) from None


def _read_once(files: list[Path], root: Path | None, cache: Path) -> MappedInput:
    """A conversion only this process sees: mapped, then unlinked (the mapping keeps it)."""
    fd, name = tempfile.mkstemp(dir=cache, prefix=".once-", suffix=".arrow")
    os.close(fd)
    try:
        _convert(files, root, Path(name))
        return open_arrow(files, [Path(name)])
    finally:
        os.unlink(name)


def _stamp(f: Path) -> list:
    st = f.stat()
    return [str(f.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "komt-batch" / "inputs"
    try:
        base.mkdir(parents=True, exist_ok=True)
        return base
    except OSError as e:
        raise JobError(f"cannot create the input cache {base} ({e.strerror}); set XDG_CACHE_HOME to a writable folder") from None


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks: two processes may convert; the rename keeps the entry whole
        yield


def _convert_atomic(files: list[Path], root: Path | None, entry: Path) -> None:
    fd, name = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        _convert(files, root, Path(name))
        os.replace(name, entry)
    except BaseException:
        os.unlink(name)
        raise


def _evict(cache: Path, keep: Path) -> None:
    """Remove entries (and leftovers of killed conversions) unused for CACHE_DAYS days. A process that
    has one mapped keeps reading it: unlinking a file leaves open mappings whole."""
    old = time.time() - CACHE_DAYS * 86400
    for f in cache.iterdir():
        with contextlib.suppress(OSError):
            if f != keep and f.stat().st_mtime < old:
                shutil.rmtree(f) if f.is_dir() else f.unlink()  # a folder: a killed conversion's spool


# --- converting files to one Arrow stream ----------------------------------------------------------

# One part of the input: a file (or a run of a JSONL file's batches with one schema), its schema with
# its partition columns, and its tables in order.
Part = tuple[Path, pa.Schema, Callable[[], Iterator[pa.Table]]]


def _convert(files: list[Path], root: Path | None, target: Path) -> None:
    """Pass 1 reads every file (JSONL is parsed and spooled as Arrow: its columns' types are known
    only at its end); pass 2 writes every part, in order, with the joined schema."""
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".spool-") as spool:
        parts: list[Part] = []
        for f in files:
            partitions = _partitions(f, root)
            for schema, tables in _parquet_parts(f) if f.name.endswith(".parquet") else _jsonl_parts(f, Path(spool)):
                for key, (_, folder) in partitions.items():
                    if key in schema.names:
                        raise JobError(f"{f}: column {key!r} is in the file and in its folder name {folder}")
                    schema = schema.append(pa.field(key, pa.string()))
                parts.append((f, schema, _with_partitions(tables, partitions)))
        schema, origin = _joined_schema([(f, s) for f, s, _ in parts])
        check_storable(schema, origin.get)
        with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for f, _, tables in parts:
                for t in tables():
                    writer.write_table(_conform(f, t, schema))


def _partitions(file: Path, root: Path | None) -> dict[str, tuple[str | None, str]]:
    """The file's `key=value` folders below the root (Hive partitions): key -> (value, folder)."""
    found: dict[str, tuple[str | None, str]] = {}
    if root is None:
        return found
    for folder in file.relative_to(root).parent.parts:
        m = _PARTITION.match(folder)
        if not m:
            continue
        key, value = unquote(m.group(1)), unquote(m.group(2))
        if key in found:
            raise JobError(f"{file}: column {key!r} is in the folder names {found[key][1]} and {folder}")
        found[key] = (None if value == _HIVE_NULL else value, folder)
    return found


def _with_partitions(tables: Callable[[], Iterator[pa.Table]], partitions: dict[str, tuple[str | None, str]]):
    def with_columns():
        for t in tables():
            for key, (value, _) in partitions.items():
                t = t.append_column(key, pa.array([value] * t.num_rows, pa.string()))
            yield t

    return with_columns


def _joined_schema(parts: list[tuple[Path, pa.Schema]]) -> tuple[pa.Schema, dict[str, Path]]:
    """The union of the parts' columns (nulls where a part lacks one), each with the type that holds
    every part's values unchanged; and the file each column was first seen in."""
    schema, origin = parts[0][1], {name: parts[0][0] for name in parts[0][1].names}
    for f, s in parts[1:]:
        for i, field in enumerate(schema):
            if field.name not in s.names:  # nulls there
                schema = schema.set(i, field.with_nullable(True))
        for field in s:
            i = schema.get_field_index(field.name)
            if i < 0:
                schema, origin[field.name] = schema.append(field.with_nullable(True)), f
            elif schema.field(i).type != field.type:
                schema = schema.set(i, _merged_field(schema.field(i), field, f, origin[field.name]))
    return schema, origin


# What an output file can hold and pyarrow, pandas and `datasets` read back (found by writing and
# reading one, pyarrow 26, datasets 4): Parquet's schema tree is read to 100 levels (the root, the
# value, 2 a list, 1 an object), and Arrow's C interface (which `datasets` uses) to 64 levels of
# nested types (the table's own, then the column's).
_PARQUET_LEVELS = 98  # 2 per list + 1 per object
_ARROW_LEVELS = 62  # lists + objects
_DEPTH_LIMITS = f"at most {_ARROW_LEVELS} levels, and {_PARQUET_LEVELS // 2} if all are lists: Parquet counts a list twice, up to {_PARQUET_LEVELS}"


def check_storable(schema: pa.Schema, file_of: Callable[[str], Path]) -> None:
    """Refuse, naming the column, what the output Parquet file could not hold or would hold unreadably:
    objects without keys (an empty struct) and lists and objects nested too deeply."""
    for field in schema:
        if problem := _unstorable(field.name, field.type):
            raise JobError(f"{file_of(field.name)}: {problem}")


def _unstorable(name: str, t: pa.DataType, empty_too: bool = True) -> str | None:
    deepest = (0, 0)  # lists, objects
    for column, inner, lists, objects in _nested(name, t, 0, 0):
        if empty_too and pa.types.is_struct(inner) and inner.num_fields == 0:
            return f"column {column!r} holds only empty objects {{}}, which Parquet cannot store"
        if lists + objects > _ARROW_LEVELS or 2 * lists + objects > _PARQUET_LEVELS:
            deepest = max(deepest, (lists, objects), key=lambda d: (sum(d), 2 * d[0] + d[1]))
    if deepest == (0, 0):
        return None
    return f"column {name!r}: lists and objects nested too deeply for the output (here {deepest[0]} lists and {deepest[1]} objects; {_DEPTH_LIMITS})"


def _nested(column: str, t: pa.DataType, lists: int, objects: int) -> Iterator[tuple[str, pa.DataType, int, int]]:
    """Every type inside t, with its place (column.key, column[]) and the lists and objects around it
    and itself."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_struct(t):
        yield column, t, lists, objects + 1
        for f in t:
            yield from _nested(f"{column}.{f.name}", f.type, lists, objects + 1)
    elif pa.types.is_map(t):
        yield column, t, lists + 1, objects + 1
        yield from _nested(f"{column}[]", t.item_type, lists + 1, objects + 1)
    elif hasattr(t, "value_type"):  # lists of every kind
        yield column, t, lists + 1, objects
        yield from _nested(f"{column}[]", t.value_type, lists + 1, objects)


def _conform(f: Path, t: pa.Table, schema: pa.Schema) -> pa.Table:
    """A part's table with the joined schema: nulls for the columns it lacks, its values cast."""
    if not schema:  # rows that are all {}: keep their number
        return _no_columns(t.num_rows)
    columns = []
    for field in schema:
        if field.name not in t.column_names:
            columns.append(pa.nulls(t.num_rows, field.type))
            continue
        column = t.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)  # a safe cast: refuses any value it would change
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise JobError(
                    f"{f}: column {field.name!r}: its {column.type} values cannot all be kept as {field.type}, "
                    f"the type the other files need ({first_line(e)})"
                ) from None
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def _no_columns(rows: int) -> pa.Table:
    return pa.table({"": pa.nulls(rows)}).drop_columns([""])


def _merged_field(old: pa.Field, new: pa.Field, file: Path, origin: Path) -> pa.Field:
    """The type both fields' values fit unchanged: pyarrow's permissive promotion (which refuses
    bool + number and string + number), except where it would change values: decimals + floats
    (rounded) and text + bytes (text would become bytes)."""
    problem = f"{file}: column {new.name!r} is {new.type} here but {old.type} in {origin}"
    if why := _value_change(old.type, new.type):
        raise JobError(f"{problem}; {why}")
    if (merged := _unified(old, new)) is not None:
        return merged
    plain = [f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in (old, new)]
    encoded = plain != [old, new] and _unified(*plain) is not None  # the same values, dictionary-encoded in one file only
    raise JobError(f"{problem}; " + ("a column is dictionary-encoded in every file or in none" if encoded else "a column holds one type of value"))


def _unified(a: pa.Field, b: pa.Field) -> pa.Field | None:
    """pyarrow's permissive promotion of two fields; None where it has none."""
    try:
        return pa.unify_schemas([pa.schema([a]), pa.schema([b])], promote_options="permissive").field(0)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _value_change(a: pa.DataType, b: pa.DataType) -> str | None:
    """Why joining types a and b would change values (None: it would not), looking into structs and lists."""
    if pa.types.is_decimal(a) or pa.types.is_decimal(b):
        return "decimals would be rounded to floats" if pa.types.is_floating(a) or pa.types.is_floating(b) else None
    if (_is_text(a) and _is_bytes(b)) or (_is_bytes(a) and _is_text(b)):
        return "text would become bytes"
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        return next((w for f in b if a.get_field_index(f.name) >= 0 and (w := _value_change(a.field(f.name).type, f.type))), None)
    if hasattr(a, "value_type") and hasattr(b, "value_type"):  # lists of any kind (and dictionaries)
        return _value_change(a.value_type, b.value_type)
    return None


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or t == pa.string_view()


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) or t == pa.binary_view()


def _parquet_parts(path: Path) -> list[tuple[pa.Schema, Callable[[], Iterator[pa.Table]]]]:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise JobError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    twice = sorted({n for n in schema.names if schema.names.count(n) > 1})
    if twice:
        raise JobError(f"{path}: more than one column is named {twice[0]!r}")

    def tables():
        try:
            with pq.ParquetFile(path, buffer_size=_PARQUET_BUFFER, pre_buffer=False) as pf:
                for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
                    yield pa.Table.from_batches([batch])
        except (OSError, pa.ArrowException) as e:
            raise JobError(f"{path}: not a readable Parquet file ({first_line(e)})") from None

    return [(schema, tables)]


# --- JSONL ---------------------------------------------------------------------------------------


class _BadValue(Exception):
    """A value that cannot be kept as it is; the reader adds the file and the line."""


def _object(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _BadValue(f"key {twice!r} appears twice in one object (one of its values would be lost)")
    return obj


def _is_row(line: str) -> bool:
    """A JSONL line that holds a row: not blank (a byte-order mark, at the file's start or where files
    were joined with cat, is no data)."""
    return bool(line.removeprefix("\ufeff").strip())


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _BadValue(f"the number {text} is beyond the range of a float64")
    return value


# NaN and Infinity (not JSON, but Python's json writes them) are kept: a float64 holds them exactly.
_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_float=_float)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _jsonl_parts(path: Path, spool: Path) -> list[tuple[pa.Schema, Callable[[], Iterator[pa.Table]]]]:
    """Parse a JSONL file (or .jsonl.gz) into Arrow batches spooled in `spool`: one part per run of
    batches with one schema (a schema grows while new keys and types appear, then stays)."""
    out = _Spool(spool)
    rows: list[dict] = []
    shapes: dict[str, object] = {}  # column -> the shape of its values so far (below)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise JobError(f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
                if not _is_row(line):
                    continue
                line = line.removeprefix("\ufeff")
                try:
                    row = _DECODER.decode(line)
                    if not isinstance(row, dict):
                        raise JobError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                    if _SURROGATE_ESCAPE.search(raw):
                        _check_encodable(row)
                    for key, value in row.items():
                        shape = _shape(value, key)
                        if key in shapes and shape == shapes[key]:
                            continue  # (most values: nothing new)
                        shapes[key] = _merge(shapes[key], shape, key) if key in shapes else shape
                        if too_deep := _unstorable(key, _arrow_type(shapes[key]), empty_too=False):
                            raise _BadValue(too_deep)
                except json.JSONDecodeError as e:
                    raise JobError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                except _BadValue as e:
                    raise JobError(f"{path}:{lineno}: {e}") from None
                except RecursionError:
                    raise JobError(f"{path}:{lineno}: lists or objects nested too deeply for the output ({_DEPTH_LIMITS})") from None
                rows.append(row)
                if len(rows) >= _JSONL_BATCH:
                    out.write(_rows_table(rows, shapes))
                    rows = []
        if rows or not out.parts:
            out.write(_rows_table(rows, shapes))
    except (OSError, EOFError, zlib.error) as e:  # EOFError, zlib.error: a truncated or damaged .gz
        raise JobError(f"{path}: cannot read ({getattr(e, 'strerror', None) or first_line(e)})") from None
    finally:
        out.close()
    return out.parts


class _Spool:
    """Arrow batches written to files in a folder, one stream per run of batches with one schema."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.parts: list[tuple[pa.Schema, Callable[[], Iterator[pa.Table]]]] = []
        self.sink = self.writer = None

    def write(self, table: pa.Table) -> None:
        if not self.parts or not self.parts[-1][0].equals(table.schema):
            self.close()
            name = self.folder / f"{len(os.listdir(self.folder)):06d}.arrow"
            self.sink = pa.OSFile(str(name), "wb")
            self.writer = pa.ipc.new_stream(self.sink, table.schema)
            self.parts.append((table.schema, lambda: _spooled(name)))
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
            self.sink = self.writer = None


def _spooled(name: Path) -> Iterator[pa.Table]:
    with pa.OSFile(str(name)) as source:  # plain reads, not a mapping: pages do not stay resident
        for batch in pa.ipc.open_stream(source):
            yield pa.Table.from_batches([batch])


def _check_encodable(row: dict) -> None:
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise _BadValue(f"a lone surrogate escape (\\u{ord(e.object[e.start]):04x}) is not text UTF-8 can hold") from None


# A shape is the type of a column's values so far: None (only nulls), "bool", "int", "bigint" (an
# integer beyond 2**53, which a float64 would round), "float", "str", ("list", item shape) or
# ("struct", {key: shape}). _merge joins two shapes where every value stays as it is.
_BIG = 2**53
_NUMBERS = {("int", "float"): "float", ("float", "int"): "float", ("int", "bigint"): "bigint", ("bigint", "int"): "bigint"}
_SCALARS = {str: "str", bool: "bool", float: "float", type(None): None}
_WORDS = {"bool": "true/false", "int": "integers", "bigint": "integers beyond 2**53", "float": "decimals", "str": "strings", "list": "lists", "struct": "objects"}
_ARROW = {None: pa.null(), "bool": pa.bool_(), "int": pa.int64(), "bigint": pa.int64(), "float": pa.float64(), "str": pa.string()}


def _shape(value: object, column: str) -> object:
    kind = type(value)
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind is int:
        if not -(2**63) <= value < 2**63:
            raise _BadValue(f"column {column!r}: the integer {value} does not fit in 64 bits")
        return "int" if -_BIG <= value <= _BIG else "bigint"
    if kind is list:
        item = None
        for v in value:
            item = _merge(item, _shape(v, column + "[]"), column + "[]")
        return ("list", item)
    return ("struct", {k: _shape(v, f"{column}.{k}") for k, v in value.items()})


def _merge(old: object, new: object, column: str) -> object:
    if old == new or new is None:
        return old
    if old is None:
        return new
    if isinstance(old, str) and isinstance(new, str) and (old, new) in _NUMBERS:
        return _NUMBERS[old, new]
    if isinstance(old, tuple) and isinstance(new, tuple) and old[0] == new[0]:
        if old[0] == "list":
            return ("list", _merge(old[1], new[1], column + "[]"))
        fields = dict(old[1])
        for k, shape in new[1].items():
            fields[k] = _merge(fields.get(k), shape, f"{column}.{k}")
        return ("struct", fields)
    why = "a float64 would round them" if (old, new) in (("bigint", "float"), ("float", "bigint")) else "a column holds one type of value"
    raise _BadValue(f"column {column!r}: {_words(new)} where earlier values are {_words(old)}; {why}")


def _words(shape: object) -> str:
    return _WORDS[shape[0] if isinstance(shape, tuple) else shape]


def _arrow_type(shape: object) -> pa.DataType:
    """The shape's Arrow type; objects without keys yet are an empty struct (the joined schema
    refuses one that never gets keys: check_storable)."""
    if not isinstance(shape, tuple):
        return _ARROW[shape]
    kind, inner = shape
    if kind == "list":
        return pa.list_(_arrow_type(inner))
    return pa.struct([(k, _arrow_type(s)) for k, s in inner.items()])


def _rows_table(rows: list[dict], shapes: dict[str, object]) -> pa.Table:
    if not shapes:  # rows that are all {} (or none): keep their number
        return _no_columns(len(rows))
    return pa.table({k: pa.array([r.get(k) for r in rows], _arrow_type(s)) for k, s in shapes.items()})
