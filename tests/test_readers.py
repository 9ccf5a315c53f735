import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.errors import JobError
from batch.readers import input_files, read_files
from batch.rows import row_ids


def test_jsonl_parquet_glob_and_directory(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "x", "q": "하나"}\n\n{"id": "y", "q": "two"}\n', encoding="utf-8")
    pq.write_table(pa.table({"id": ["z"], "q": ["셋"]}), tmp_path / "b.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    for spec in (str(tmp_path), str(tmp_path / "*")):
        files = input_files(spec)
        assert [f.name for f in files] == ["a.jsonl", "b.parquet"]
        t = read_files(files).table
        assert t.column("id").to_pylist() == ["x", "y", "z"]
        assert t.column("q").to_pylist() == ["하나", "two", "셋"]


def test_ids_by_column_or_position(tmp_path):
    t = pa.table({"id": [3, 1, 2], "q": ["a", "b", "c"]})
    assert list(row_ids(t, "id", "job")) == ["3", "1", "2"]
    assert list(row_ids(t, None, "job")) == ["0", "1", "2"]


def test_duplicate_ids_named():
    t = pa.table({"id": ["a", "b", "a", "c", "c"]})
    with pytest.raises(JobError, match=r"duplicate ids in the input \(2\), e.g. 'a', 'c'"):
        row_ids(t, "id", "job")


@pytest.mark.parametrize(
    "dupe, at",
    [
        ("x", ["a.jsonl:1", "a.jsonl:5"]),  # a blank line and a byte-order mark are no rows; lines count them
        ("y", ["a.jsonl:3", "b.parquet row 2"]),
        ("z", ["c.jsonl.gz:2", "d=1/e.jsonl:1"]),  # a gzip file, a partition folder's file
    ],
)
def test_duplicate_ids_say_where_in_which_files(tmp_path, capsys, dupe, at):
    """The first id given twice is named with its two places: the file and its line (JSONL) or row."""
    import gzip

    from batch.cli import main
    from tests.conftest import make_job

    ids = {"a": ["x", "y", "p", "x"], "b": ["q", "y"], "c": ["r", "z"], "e": ["z"]}
    for k in ("x", "y", "z"):
        if k != dupe:  # one duplicate at a time: the others made unique
            ids = {f: [v if v != k else f"{k}-{f}-{i}" for i, v in enumerate(vs)] for f, vs in ids.items()}
    line = lambda i: json.dumps({"id": i, "instruction": "q"})  # noqa: E731
    src = tmp_path / "in"
    (src / "d=1").mkdir(parents=True)
    (src / "a.jsonl").write_bytes(f"{line(ids['a'][0])}\n\n\ufeff{line(ids['a'][1])}\n{line(ids['a'][2])}\n{line(ids['a'][3])}\n".encode())
    pq.write_table(pa.table({"id": ids["b"], "instruction": ["q", "q"]}), src / "b.parquet")
    (src / "c.jsonl.gz").write_bytes(gzip.compress("".join(line(i) + "\n" for i in ids["c"]).encode()))
    (src / "d=1" / "e.jsonl").write_text(line(ids["e"][0]) + "\n")
    assert main(["validate", str(make_job(tmp_path, src))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"input.id_column: duplicate ids in the input (1), e.g. {dupe!r}; {dupe!r} is at {src / at[0]} and {src / at[1]}"), err


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b'{"id": 1}\n{"id": \n', "x.jsonl:2: not valid JSON"),
        (b'{"id": 1}\n[1, 2]\n', "x.jsonl:2: expected a JSON object, got list"),
        (b'{"id": 1}\n{"id": "\xff"}\n', "x.jsonl:2: invalid UTF-8"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, fragment):
    (tmp_path / "x.jsonl").write_bytes(content)
    with pytest.raises(JobError, match=fragment):
        read_files([tmp_path / "x.jsonl"])


def test_missing_input_and_empty_glob(tmp_path):
    with pytest.raises(JobError, match="no such file"):
        input_files(str(tmp_path / "none.jsonl"))
    with pytest.raises(JobError, match="matches no .jsonl, .jsonl.gz or .parquet file"):
        input_files(str(tmp_path / "*.jsonl"))


def test_files_with_different_columns_are_joined_with_nulls(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": 1, "q": "a"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": 2, "question": "b"}) + "\n")
    t = read_files(input_files(str(tmp_path))).table
    assert t.to_pylist() == [{"id": 1, "q": "a", "question": None}, {"id": 2, "q": None, "question": "b"}]


def test_column_types_must_agree_across_files(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": 1, "q": "a"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "2", "q": "b"}) + "\n")
    with pytest.raises(JobError, match=r"b.jsonl: column 'id' is string here but int64 in .*a.jsonl; a column holds one type of value"):
        read_files(input_files(str(tmp_path)))


def test_truncated_parquet(tmp_path):
    pq.write_table(pa.table({"id": list(range(100))}), tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(JobError, match="t.parquet: not a readable Parquet file"):
        read_files([tmp_path / "t.parquet"])


@pytest.mark.parametrize("fresh", [False, True])  # into the cache, or (a file changed just now) converted once
def test_a_full_disk_in_the_input_cache_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, fresh):
    import errno
    import os
    import time

    from batch import readers
    from batch.errors import WriteError

    src = tmp_path / "in.jsonl"
    src.write_text('{"q": "a"}\n')
    if not fresh:
        old = time.time() - 60
        os.utime(src, (old, old))
    cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    convert = readers._convert

    def full(files, root, target):
        convert(files, root, target)  # written whole, then the disk is full (e.g. at its last block)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(readers, "_convert", full)
    with pytest.raises(WriteError) as e:
        read_files([src])
    assert str(e.value).startswith(f"cannot write the input cache {cache / 'komt-batch' / 'inputs'} (No space left on device)")
    assert e.value.exit_code == 74
    assert [p.name for p in (cache / "komt-batch" / "inputs").iterdir() if not p.name.endswith(".lock")] == []
