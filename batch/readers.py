"""Input: a .jsonl or .parquet file, a glob, or a directory of such files -> one Arrow table.

The input is read once into Arrow memory (compact: about the size of the text itself), because the
final file repeats every input column in input order. Every value arrives as it was, or the input is
refused (JobError naming the file, the column and, for JSONL, the line):

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
- a directory's `key=value` folders (Hive partitions) add the column `key` with the string `value`.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq

from batch.errors import JobError

SUFFIXES = (".jsonl", ".parquet")
_JSONL_BATCH = 20_000  # lines parsed into one Arrow batch: bounds the Python objects alive at once
_PARTITION = re.compile(r"^([^=]+)=(.*)$")  # a Hive partition folder: key=value
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # how Hive, Spark and pyarrow write a null partition value


def input_files(path: str) -> list[Path]:
    """The files named by input.path, sorted, so that row positions are stable.

    A path that exists is taken as named, even when it looks like a glob (`prompts[v2].jsonl`)."""
    p = Path(path)
    if not p.exists() and glob.has_magic(path):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if f.endswith(SUFFIXES))
        if not files:
            raise JobError(f"input.path: the glob {path!r} matches no .jsonl or .parquet file")
        return files
    if p.is_dir():
        files = sorted(_listing(p))
        if not files:
            raise JobError(f"input.path: the directory {path} holds no .jsonl or .parquet file")
        return files
    if not p.exists():
        raise JobError(f"input.path: {path}: no such file")
    if p.suffix not in SUFFIXES:
        raise JobError(f"input.path: {path}: expected a .jsonl or .parquet file")
    return [p]


def _listing(directory: Path):
    """The directory's input files, and those in its `key=value` (Hive partition) folders."""
    for f in directory.iterdir():
        if f.is_dir() and _PARTITION.match(f.name):
            yield from _listing(f)
        elif f.suffix in SUFFIXES and f.is_file():
            yield f


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


def read_table(files: list[Path], root: Path | None = None) -> pa.Table:
    """All rows of all files, in file order then row order, as one table (columns: the union)."""
    tables = []
    for f in files:
        table = _read_parquet(f) if f.suffix == ".parquet" else _read_jsonl(f)
        tables.append((f, _add_partitions(table, f, root)))
    return _join(tables)


def _add_partitions(table: pa.Table, file: Path, root: Path | None) -> pa.Table:
    if root is None:
        return table
    for folder in file.relative_to(root).parent.parts:
        m = _PARTITION.match(folder)
        if not m:
            continue
        key, value = unquote(m.group(1)), unquote(m.group(2))
        if key in table.column_names:
            raise JobError(f"{file}: column {key!r} is in the file and in its folder name {folder}")
        table = table.append_column(key, pa.array([None if value == _HIVE_NULL else value] * table.num_rows, pa.string()))
    return table


def _join(tables: list[tuple[Path, pa.Table]]) -> pa.Table:
    """One table from parts whose columns may differ: the union of their columns (nulls where a part
    lacks one), each with the type that holds every part's values unchanged."""
    if len(tables) == 1:
        return tables[0][1]
    schema, origin = tables[0][1].schema, {name: tables[0][0] for name in tables[0][1].column_names}
    for f, t in tables[1:]:
        for i, field in enumerate(schema):
            if field.name not in t.column_names:  # nulls there
                schema = schema.set(i, field.with_nullable(True))
        for field in t.schema:
            i = schema.get_field_index(field.name)
            if i < 0:
                schema, origin[field.name] = schema.append(field.with_nullable(True)), f
            elif schema.field(i).type != field.type:
                schema = schema.set(i, _merged_field(schema.field(i), field, f, origin[field.name]))
    if not schema:  # rows that are all {}: keep their number
        return _no_columns(sum(t.num_rows for _, t in tables))
    joined = []
    for f, t in tables:
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
                        f"the type the other files need ({_first_line(e)})"
                    ) from None
            columns.append(column)
        joined.append(pa.Table.from_arrays(columns, schema=schema))
    return pa.concat_tables(joined)


def _no_columns(rows: int) -> pa.Table:
    return pa.table({"": pa.nulls(rows)}).drop_columns([""])


def _first_line(e: Exception) -> str:
    return str(e).partition("\n")[0]  # a refusal is one line


def _merged_field(old: pa.Field, new: pa.Field, file: Path, origin: Path) -> pa.Field:
    """The type both fields' values fit unchanged: pyarrow's permissive promotion (which refuses
    bool + number and string + number), except decimals + floats, which it would round."""
    problem = f"{file}: column {new.name!r} is {new.type} here but {old.type} in {origin}"
    if _rounds_decimals(old.type, new.type):
        raise JobError(f"{problem}; decimals would be rounded to floats")
    try:
        return pa.unify_schemas([pa.schema([old]), pa.schema([new])], promote_options="permissive").field(0)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise JobError(f"{problem}; a column holds one type of value") from None


def _rounds_decimals(a: pa.DataType, b: pa.DataType) -> bool:
    if pa.types.is_decimal(a) or pa.types.is_decimal(b):
        return pa.types.is_floating(a) or pa.types.is_floating(b)
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        return any(_rounds_decimals(a.field(f.name).type, f.type) for f in b if a.get_field_index(f.name) >= 0)
    if hasattr(a, "value_type") and hasattr(b, "value_type"):  # lists of any kind
        return _rounds_decimals(a.value_type, b.value_type)
    return False


def _read_parquet(path: Path) -> pa.Table:
    try:
        names = pq.read_schema(path).names
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise JobError(f"{path}: more than one column is named {twice[0]!r}")
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise JobError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None


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


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _BadValue(f"the number {text} is beyond the range of a float64")
    return value


# NaN and Infinity (not JSON, but Python's json writes them) are kept: a float64 holds them exactly.
_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_float=_float)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _read_jsonl(path: Path) -> pa.Table:
    batches: list[tuple[Path, pa.Table]] = []
    rows: list[dict] = []
    shapes: dict[str, object] = {}  # column -> the shape of its values so far (below)
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise JobError(f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
                # a byte-order mark (at the file's start, or where files were joined with cat) is no data
                line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    row = _DECODER.decode(line)
                    if not isinstance(row, dict):
                        raise JobError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                    if _SURROGATE_ESCAPE.search(raw):
                        _check_encodable(row)
                    for key, value in row.items():
                        shape = _shape(value, key)
                        if key not in shapes:
                            shapes[key] = shape
                        elif shape != shapes[key]:
                            shapes[key] = _merge(shapes[key], shape, key)
                except json.JSONDecodeError as e:
                    raise JobError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                except _BadValue as e:
                    raise JobError(f"{path}:{lineno}: {e}") from None
                except RecursionError:
                    raise JobError(f"{path}:{lineno}: lists or objects nested too deeply") from None
                rows.append(row)
                if len(rows) >= _JSONL_BATCH:
                    batches.append((path, _rows_table(rows, shapes, path)))
                    rows = []
    except OSError as e:
        raise JobError(f"{path}: cannot read ({e.strerror})") from None
    if rows or not batches:
        batches.append((path, _rows_table(rows, shapes, path)))
    return _join(batches)


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


def _arrow_type(shape: object, column: str, path: Path) -> pa.DataType:
    if not isinstance(shape, tuple):
        return _ARROW[shape]
    kind, inner = shape
    if kind == "list":
        return pa.list_(_arrow_type(inner, column + "[]", path))
    if not inner:
        raise JobError(f"{path}: column {column!r} holds only empty objects {{}}, which Parquet cannot store")
    return pa.struct([(k, _arrow_type(s, f"{column}.{k}", path)) for k, s in inner.items()])


def _rows_table(rows: list[dict], shapes: dict[str, object], path: Path) -> pa.Table:
    if not shapes:  # rows that are all {} (or none): keep their number
        return _no_columns(len(rows))
    return pa.table({k: pa.array([r.get(k) for r in rows], _arrow_type(s, k, path)) for k, s in shapes.items()})


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
