"""Input and output fidelity (issue 11): every input value arrives in the output as it was, or the
input is refused in one line naming the file, the column and the line; every path the job writes is
checked by `validate` and by `run` before the model loads.

Values are compared as JSON text, so that 1 and 1.0, or a key and a key with null, are different."""

import json
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import readers, runner
from batch.cli import main
from batch.config import load_job
from batch.rows import read_rows
from tests.conftest import make_job, read_output

TEMPLATE = "### instruction: {q}\n\n### Response:"
GENERATED = ["response", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "error", "row_fingerprint"]


def lay_out(root: Path, files: dict) -> None:
    """Write files: JSONL as text or bytes, Parquet as a pyarrow table."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, pa.Table):
            pq.write_table(content, path)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())


def lines(*rows: str) -> str:
    return "".join(r + "\n" for r in rows)


def as_json(values) -> str:
    return json.dumps(values, ensure_ascii=False)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything reaches the model (the tokenizer loads first, then the weights)."""

    def touched(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(runner, "load_tokenizer", touched)


# --- 1. every input value arrives as it was ------------------------------------------------------

BIG = 2**60  # an int64 that a float64 would round
KEPT = {
    # name: (files, input.path, {column: values as read}); every row has a prompt in "q"
    "a key first on line 2": (
        {"in.jsonl": lines('{"q": "a"}', '{"q": "b", "late": 1}')}, "in.jsonl", {"late": [None, 1]}),
    "a key first on line 3,000": (
        {"in.jsonl": lines(*['{"q": "a"}'] * 2999, '{"q": "b", "late": "x"}')}, "in.jsonl", {"late": [None] * 2999 + ["x"]}),
    "a key first after the 20,000-line batch": (
        {"in.jsonl": lines(*['{"q": "a", "n": 1}'] * 20_000, '{"q": "b", "n": 2.5, "late": {"k": [true]}}')},
        "in.jsonl",
        {"late": [None] * 20_000 + [{"k": [True]}], "n": [1.0] * 20_000 + [2.5]},
    ),
    "a key null on some lines": (
        {"in.jsonl": lines('{"q": "a", "m": null}', '{"q": "b", "m": "x"}', '{"q": "c"}')}, "in.jsonl", {"m": [None, "x", None]}),
    "a column of nulls only": ({"in.jsonl": lines('{"q": "a", "m": null}', '{"q": "b"}')}, "in.jsonl", {"m": [None, None]}),
    "integers stay integers": ({"in.jsonl": lines('{"q": "a", "n": 1}', '{"q": "b", "n": -7}')}, "in.jsonl", {"n": [1, -7]}),
    "integers then decimals": ({"in.jsonl": lines('{"q": "a", "n": 1}', '{"q": "b", "n": 1.5}')}, "in.jsonl", {"n": [1.0, 1.5]}),
    "decimals then integers": ({"in.jsonl": lines('{"q": "a", "n": 0.25}', '{"q": "b", "n": 3}')}, "in.jsonl", {"n": [0.25, 3.0]}),
    "2**53 beside decimals": (
        {"in.jsonl": lines('{"q": "a", "n": 9007199254740992}', '{"q": "b", "n": 0.5}')}, "in.jsonl", {"n": [2.0**53, 0.5]}),
    "integers beyond 2**53": (
        {"in.jsonl": lines(f'{{"q": "a", "n": {BIG + 1}}}', '{"q": "b", "n": 1}')}, "in.jsonl", {"n": [BIG + 1, 1]}),
    "true/false": ({"in.jsonl": lines('{"q": "a", "b": true}', '{"q": "b", "b": false}')}, "in.jsonl", {"b": [True, False]}),
    "NaN and Infinity": (
        {"in.jsonl": lines('{"q": "a", "x": NaN}', '{"q": "b", "x": -Infinity}', '{"q": "c", "x": 2}')},
        "in.jsonl",
        {"x": [float("nan"), float("-inf"), 2.0]},
    ),
    "objects with different keys": (
        {"in.jsonl": lines('{"q": "a", "m": {"a": 1}}', '{"q": "b", "m": {"b": [1, 2.5]}}', '{"q": "c", "m": null}')},
        "in.jsonl",
        {"m": [{"a": 1, "b": None}, {"a": None, "b": [1.0, 2.5]}, None]},
    ),
    "lists of any length": (
        {"in.jsonl": lines('{"q": "a", "t": []}', '{"q": "b", "t": ["x", null]}', '{"q": "c", "t": null}')},
        "in.jsonl",
        {"t": [[], ["x", None], None]},
    ),
    "rows that are all {}": (
        {"d/a.jsonl": lines("{}", "{}"), "d/b.jsonl": lines('{"q": "b"}')}, "d", {"q": [None, None, "b"]}),
    "keys differing only in case": ({"in.jsonl": lines('{"q": "a", "K": 1, "k": "x"}')}, "in.jsonl", {"K": [1], "k": ["x"]}),
    "an emoji as a surrogate pair escape": ({"in.jsonl": lines('{"q": "\\ud83d\\ude00"}')}, "in.jsonl", {"q": ["😀"]}),
    "a byte-order mark at the start": ({"in.jsonl": b'\xef\xbb\xbf{"q": "a", "n": 1}\n'}, "in.jsonl", {"q": ["a"], "n": [1]}),
    "a byte-order mark where files were joined": (
        {"in.jsonl": b'\xef\xbb\xbf{"q": "a"}\n\xef\xbb\xbf{"q": "b"}\n'}, "in.jsonl", {"q": ["a", "b"]}),
    "CRLF line endings": ({"in.jsonl": b'{"q": "a", "s": "x"}\r\n\r\n{"q": "b", "s": "y"}\r\n'}, "in.jsonl", {"s": ["x", "y"]}),
    "a file name that looks like a glob": ({"in[v2]*.jsonl": lines('{"q": "a"}')}, "in[v2]*.jsonl", {"q": ["a"]}),
    "files with different columns": (
        {"d/a.jsonl": lines('{"q": "a", "x": 1}'), "d/b.jsonl": lines('{"extra": "e", "q": "b"}')},
        "d",
        {"q": ["a", "b"], "x": [1, None], "extra": [None, "e"]},
    ),
    "Parquet files with compatible types": (
        {
            "d/a.parquet": pa.table({"q": ["a"], "n": pa.array([1], pa.int32()), "s": pa.nulls(1)}),
            "d/b.parquet": pa.table({"q": ["b"], "n": pa.array([BIG], pa.int64()), "s": ["x"]}),
        },
        "d",
        {"n": [1, BIG], "s": [None, "x"]},
    ),
    "JSONL and Parquet, integers and decimals": (
        {"d/a.jsonl": lines('{"q": "a", "n": 1}'), "d/b.parquet": pa.table({"q": ["b"], "n": [2.5]})}, "d", {"n": [1.0, 2.5]}),
    "a Hive-partitioned folder": (
        {
            "d/lang=en/part-0.parquet": pa.table({"q": ["a"]}),
            "d/lang=ko/part-0.parquet": pa.table({"q": ["b", "c"]}),
            "d/lang=a%2Fb/part-0.jsonl": lines('{"q": "d"}'),
            "d/lang=__HIVE_DEFAULT_PARTITION__/part-0.parquet": pa.table({"q": ["e"]}),
            "d/notes/ignored.jsonl": lines('{"q": "not an input"}'),
        },
        "d",
        {"q": ["e", "d", "a", "b", "c"], "lang": [None, "a/b", "en", "ko", "ko"]},
    ),
    "a glob over Hive partitions": (
        {"d/year=2024/a.jsonl": lines('{"q": "a"}'), "d/year=2025/a.jsonl": lines('{"q": "b"}')},
        "d/*/*.jsonl",
        {"year": ["2024", "2025"]},
    ),
}


@pytest.mark.parametrize("name", list(KEPT))
def test_every_value_is_read_as_it_was(tmp_path, name):
    files, path, expected = KEPT[name]
    lay_out(tmp_path, files)
    job = load_job(make_job(tmp_path, tmp_path / path, input={"id_column": None}, prompt={"template": TEMPLATE}))
    table = read_rows(job).table
    for column, values in expected.items():
        assert as_json(table.column(column).to_pylist()) == as_json(values), column


REFUSED = {
    # name: (files, input.path, the refusal after "komt-batch: error: <tmp>/")
    "true among integers": ({"in.jsonl": lines('{"q": "a", "n": 1}', '{"q": "b", "n": true}')}, "in.jsonl",
                            "in.jsonl:2: column 'n': true/false where earlier values are integers"),
    "true among decimals": ({"in.jsonl": lines('{"q": "a", "n": 1.5}', '{"q": "b", "n": true}')}, "in.jsonl",
                            "in.jsonl:2: column 'n': true/false where earlier values are decimals"),
    "a number among true/false": ({"in.jsonl": lines('{"q": "a", "n": false}', '{"q": "b", "n": 0}')}, "in.jsonl",
                                  "in.jsonl:2: column 'n': integers where earlier values are true/false"),
    "a string among numbers": ({"in.jsonl": lines('{"q": "a", "n": 1}', '{"q": "b", "n": "2"}')}, "in.jsonl",
                               "in.jsonl:2: column 'n': strings where earlier values are integers"),
    "a number among strings": ({"in.jsonl": lines('{"q": "a", "id": "x1"}', '', '{"q": "b", "id": 2}')}, "in.jsonl",
                               "in.jsonl:3: column 'id': integers where earlier values are strings"),
    "an integer beyond 2**53 among decimals": (
        {"in.jsonl": lines('{"q": "a", "n": 0.5}', '{"q": "b", "n": 1}', f'{{"q": "c", "n": {BIG}}}')}, "in.jsonl",
        "in.jsonl:3: column 'n': integers beyond 2**53 where earlier values are decimals; a float64 would round them"),
    "a decimal among integers beyond 2**53": (
        {"in.jsonl": lines(f'{{"q": "a", "n": {BIG}}}', '{"q": "b", "n": 0.5}')}, "in.jsonl",
        "in.jsonl:2: column 'n': decimals where earlier values are integers beyond 2**53; a float64 would round them"),
    "an integer beyond 64 bits": ({"in.jsonl": lines(f'{{"q": "a", "n": {2**64}}}')}, "in.jsonl",
                                  f"in.jsonl:1: column 'n': the integer {2**64} does not fit in 64 bits"),
    "a decimal beyond float64": ({"in.jsonl": lines('{"q": "a", "n": 1e400}')}, "in.jsonl",
                                 "in.jsonl:1: the number 1e400 is beyond the range of a float64"),
    "a key twice in one object": ({"in.jsonl": lines('{"q": "a"}', '{"q": "b", "q": "c"}')}, "in.jsonl",
                                  "in.jsonl:2: key 'q' appears twice in one object"),
    "a key twice in a nested object": ({"in.jsonl": lines('{"q": "a", "m": {"k": 1, "k": 2}}')}, "in.jsonl",
                                       "in.jsonl:1: key 'k' appears twice in one object"),
    "a lone surrogate escape": ({"in.jsonl": lines('{"q": "a\\udc00"}')}, "in.jsonl",
                                "in.jsonl:1: a lone surrogate escape (\\udc00) is not text UTF-8 can hold"),
    "types mixed inside objects": ({"in.jsonl": lines('{"q": "a", "m": {"k": 1}}', '{"q": "b", "m": {"k": "x"}}')}, "in.jsonl",
                                   "in.jsonl:2: column 'm.k': strings where earlier values are integers"),
    "types mixed inside a list": ({"in.jsonl": lines('{"q": "a", "t": [1, true]}')}, "in.jsonl",
                                  "in.jsonl:1: column 't[]': true/false where earlier values are integers"),
    "an object among lists": ({"in.jsonl": lines('{"q": "a", "t": [1]}', '{"q": "b", "t": {"k": 1}}')}, "in.jsonl",
                              "in.jsonl:2: column 't': objects where earlier values are lists"),
    "only empty objects": ({"in.jsonl": lines('{"q": "a", "m": {}}')}, "in.jsonl",
                           "in.jsonl: column 'm' holds only empty objects {}, which Parquet cannot store"),
    "lists nested too deeply": ({"in.jsonl": lines('{"q": "a", "t": ' + "[" * 5000 + "]" * 5000 + "}")}, "in.jsonl",
                                "in.jsonl:1: lists or objects nested too deeply"),
    "a BOM inside a line": ({"in.jsonl": b'{"q": "a"} \xef\xbb\xbf\n'}, "in.jsonl", "in.jsonl:1: not valid JSON"),
    "types that disagree across files": (
        {"d/a.jsonl": lines('{"q": "a", "n": 1}'), "d/b.jsonl": lines('{"q": "b", "n": "1"}')}, "d",
        "d/b.jsonl: column 'n' is string here but int64 in"),
    "true/false in one file, numbers in another": (
        {"d/a.parquet": pa.table({"q": ["a"], "n": [True]}), "d/b.jsonl": lines('{"q": "b", "n": 1}')}, "d",
        "d/b.jsonl: column 'n' is int64 here but bool in"),
    "big integers in one file, decimals in another": (
        {"d/a.parquet": pa.table({"q": ["a"], "n": [BIG]}), "d/b.parquet": pa.table({"q": ["b"], "n": [0.5]})}, "d",
        "d/a.parquet: column 'n': its int64 values cannot all be kept as double"),
    "Parquet decimals with floats": (
        {"d/a.parquet": pa.table({"q": ["a"], "n": pa.array([Decimal("0.1")], pa.decimal128(10, 2))}),
         "d/b.jsonl": lines('{"q": "b", "n": 0.5}')}, "d",
        "d/b.jsonl: column 'n' is double here but decimal128(10, 2) in"),
    "text in one file, bytes in another": (
        {"d/a.parquet": pa.table({"q": ["a"], "t": ["hello"]}), "d/b.parquet": pa.table({"q": ["b"], "t": pa.array([b"x"], pa.binary())})}, "d",
        "d/b.parquet: column 't' is binary here but string in"),
    "text in one file, bytes in another, inside a struct": (
        {"d/a.parquet": pa.table({"q": ["a"], "m": [{"t": "hi"}]}),
         "d/b.parquet": pa.table({"q": ["b"], "m": pa.array([{"t": b"x"}], pa.struct([("t", pa.large_binary())]))})}, "d",
        "d/b.parquet: column 'm' is struct<t: large_binary> here but struct<t: string> in"),
    "dictionary-encoded in one file, plain in another": (
        {"d/a.parquet": pa.table({"q": ["a"], "c": pa.array(["x"]).dictionary_encode()}), "d/b.parquet": pa.table({"q": ["b"], "c": ["y"]})}, "d",
        "d/b.parquet: column 'c' is string here but dictionary<values=string, indices=int32, ordered=0> in"),
    "a partition key that is also a column": (
        {"d/lang=ko/a.jsonl": lines('{"q": "a", "lang": "en"}')}, "d",
        "d/lang=ko/a.jsonl: column 'lang' is in the file and in its folder name lang=ko"),
    "a Parquet file with a column twice": (
        {"in.parquet": pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], ["q", "q"])}, "in.parquet",
        "in.parquet: more than one column is named 'q'"),
}


def refusal(tmp_path, capsys, job: Path, *args: str) -> str:
    """validate and run both refuse in one line with exit 2, before the model, writing nothing."""
    before = tree(tmp_path)
    messages = []
    for command in ("validate", "run"):
        code = main([command, str(job), *(["--no-progress"] if command == "run" else []), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("komt-batch: error: "), err
        messages.append(err[0])
    assert messages[0] == messages[1]
    assert tree(tmp_path) == before  # nothing created, nothing changed
    return messages[0].removeprefix("komt-batch: error: ")


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_value_that_would_change_is_refused_at_its_line(tmp_path, capsys, no_model, name):
    files, path, fragment = REFUSED[name]
    lay_out(tmp_path, files)
    job = make_job(tmp_path, tmp_path / path, input={"id_column": None}, prompt={"template": TEMPLATE})
    message = refusal(tmp_path, capsys, job)
    assert f"{tmp_path}/{fragment}" in message, message


@pytest.mark.parametrize(("name", "why"), [
    ("text in one file, bytes in another", "text would become bytes"),
    ("text in one file, bytes in another, inside a struct", "text would become bytes"),
    ("dictionary-encoded in one file, plain in another", "a column is dictionary-encoded in every file or in none"),
])
def test_a_refused_join_says_why(tmp_path, capsys, no_model, name, why):
    files, path, _ = REFUSED[name]
    lay_out(tmp_path, files)
    job = make_job(tmp_path, tmp_path / path, input={"id_column": None}, prompt={"template": TEMPLATE})
    assert refusal(tmp_path, capsys, job).endswith(f"; {why}")


def test_the_line_is_right_across_arrow_batches(tmp_path, capsys, no_model, monkeypatch):
    monkeypatch.setattr(readers, "_JSONL_BATCH", 2)
    lay_out(tmp_path, {"in.jsonl": lines(*['{"q": "a", "n": 1}'] * 4, "", '{"q": "b", "n": 2.5, "m": 1}', '{"q": "c", "m": true}')})
    job = make_job(tmp_path, tmp_path / "in.jsonl", input={"id_column": None}, prompt={"template": TEMPLATE})
    assert refusal(tmp_path, capsys, job) == f"{tmp_path}/in.jsonl:7: column 'm': true/false where earlier values are integers; a column holds one type of value"


def test_values_arrive_in_the_output_file_as_they_were(tmp_path, capsys):
    """A real run: the output's input columns, re-read from Parquet, are the JSON's values."""
    long = "아주 긴 질문 " * 400
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b"\xef\xbb\xbf"
        + lines(
            '{"id": "r1", "q": "하나", "n": 1, "big": 1152921504606846977, "m": {"a": 1}}',
            '{"id": "r2", "q": "two", "n": 2.5, "x": NaN, "t": [], "big": 3}',
            '{"id": "r3", "q": "셋", "late": true, "m": {"b": ["x"]}, "t": [1.5, 2], "none": null}',
            json.dumps({"id": "long", "q": long}, ensure_ascii=False),
        ).replace("\n", "\r\n").encode()
    )
    job = make_job(tmp_path, src, prompt={"template": TEMPLATE}, generation={"max_new_tokens": 2})
    assert main(["run", str(job), "--no-progress"]) == 0
    out = pq.read_table(tmp_path / "out" / "result.parquet")
    assert out.column_names == ["id", "q", "n", "big", "m", "x", "t", "late", "none", *GENERATED]
    rows = out.to_pylist()
    assert as_json([{k: r[k] for k in out.column_names[:9]} for r in rows]) == as_json(
        [
            {"id": "r1", "q": "하나", "n": 1.0, "big": 2**60 + 1, "m": {"a": 1, "b": None}, "x": None, "t": None, "late": None, "none": None},
            {"id": "r2", "q": "two", "n": 2.5, "big": 3, "m": None, "x": float("nan"), "t": [], "late": None, "none": None},
            {"id": "r3", "q": "셋", "n": None, "big": None, "m": {"a": None, "b": ["x"]}, "x": None, "t": [1.5, 2.0], "late": True, "none": None},
            {"id": "long", "q": long, "n": None, "big": None, "m": None, "x": None, "t": None, "late": None, "none": None},
        ]
    )
    too_long = rows[3]
    assert too_long["finish_reason"] == "error" and too_long["error"].startswith("too_long: the prompt has ")
    assert too_long["prompt_tokens"] == int(too_long["error"].split("the prompt has ")[1].split()[0]) > 2046


def test_partitions_glob_names_and_home_in_a_real_run(tmp_path, capsys, monkeypatch):
    """A Hive-partitioned folder whose name looks like a glob, files with different columns, the
    output under `~`: the partition key is a column, missing columns are nulls, no folder named ~."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    lay_out(
        tmp_path,
        {
            "in[1]/lang=en/a.parquet": pa.table({"id": ["e1"], "q": ["hello"], "n": pa.array([7], pa.int16())}),
            "in[1]/lang=ko/a.jsonl": lines('{"id": "k1", "q": "안녕", "extra": [1]}'),
        },
    )
    job = make_job(tmp_path, "in[1]", prompt={"template": TEMPLATE}, generation={"max_new_tokens": 2},
                   output={"path": "~/results/{date}.parquet"})
    assert main(["run", str(job), "--no-progress", "--date", "2026-01-02"]) == 0
    rows = read_output(home / "results" / "2026-01-02.parquet")
    assert [{k: r[k] for k in ("id", "q", "n", "lang", "extra")} for r in rows] == [
        {"id": "e1", "q": "hello", "n": 7, "lang": "en", "extra": None},
        {"id": "k1", "q": "안녕", "n": None, "lang": "ko", "extra": [1]},
    ]
    assert (home / "results" / "2026-01-02.summary.json").exists()
    assert not (tmp_path / "~").exists()


# --- 2. every path problem is found before any generation ----------------------------------------


def made(path: Path, kind: str, *args: str) -> list[str]:
    """Create a folder or a file at `path` (and its folders); returns the CLI arguments `args`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if kind == "folder" else path.write_text("x")
    return list(args)


PATHS = {
    # name: (setup(tmp_path) -> CLI arguments, the refusal after "komt-batch: error: <job file>: ")
    "output.path is an existing folder": (
        lambda t: made(t / "out" / "result.parquet", "folder"), "output.path: {t}/out/result.parquet is an existing directory"),
    "output.path ends with /": (lambda t: [f"output.path={t}/out/"], "output.path: {t}/out/ names a directory"),
    "output.path is .": (lambda t: ["output.path=."], "output.path: . names a directory"),
    "output.path under a file": (
        lambda t: made(t / "a-file", "file", f"output.path={t}/a-file/out.parquet"),
        "output.path: cannot write under {t}/a-file: {t}/a-file is a file, not a directory"),
    "output.path two folders under a file": (
        lambda t: made(t / "a-file", "file", f"output.path={t}/a-file/x/y/out.parquet"),
        "output.path: cannot write under {t}/a-file/x/y: {t}/a-file is a file, not a directory"),
    "output.path's {date} folder is a file": (
        lambda t: made(t / "runs" / "2026-01-02", "file", f"output.path={t}/runs/{{date}}/out.parquet", "--date", "2026-01-02"),
        "output.path: cannot write under {t}/runs/2026-01-02: {t}/runs/2026-01-02 is a file, not a directory"),
    "output.path where no file can be made": (
        lambda t: ["output.path=/proc/komt-test/out.parquet"],
        "output.path: cannot write under /proc/komt-test: creating a file in /proc failed"),
    "an output file name too long": (
        lambda t: [f"output.path={t}/{'x' * 250}.parquet"],
        "output.path: the name " + "x" * 24 + "... is longer than a file system allows (255 bytes)"),
    "an output file name too long for its temporary file": (
        lambda t: [f"output.path={t}/{'x' * 240}.parquet"],
        "output.path: cannot write under {t}: creating a file in {t} failed (File name too long)"),
    "an output folder name too long": (
        lambda t: [f"output.path={t}/{'d' * 256}/out.parquet"],
        "output.path: the name " + "d" * 24 + "... is longer than a file system allows (255 bytes)"),
    "output.path under ~ of no user": (
        lambda t: ["output.path=~no-such-user-komt/out.parquet"],
        "output.path: cannot expand '~no-such-user-komt' in '~no-such-user-komt/out.parquet'"),
    "the summary path is a folder": (
        lambda t: made(t / "out" / "result.summary.json", "folder"),
        "output.path (its summary): {t}/out/result.summary.json is an existing directory"),
    "checkpoint.dir is a file": (
        lambda t: made(t / "a-file", "file", f"checkpoint.dir={t}/a-file"),
        "checkpoint.dir: cannot write under {t}/a-file: {t}/a-file is a file, not a directory"),
    "the default checkpoint folder is a file": (
        lambda t: made(t / "out" / "result.parquet.parts", "file"),
        "checkpoint.dir (default: output.path + .parts): cannot write under {t}/out/result.parquet.parts: "
        "{t}/out/result.parquet.parts is a file, not a directory"),
    "checkpoint.dir under a file": (
        lambda t: made(t / "a-file", "file", f"checkpoint.dir={t}/a-file/parts"),
        "checkpoint.dir: cannot write under {t}/a-file/parts: {t}/a-file is a file, not a directory"),
    "checkpoint.dir where no file can be made": (
        lambda t: ["checkpoint.dir=/proc/komt-test-parts"],
        "checkpoint.dir: cannot write under /proc/komt-test-parts: creating a file in /proc failed"),
    "checkpoint.dir under ~ of no user": (
        lambda t: ["checkpoint.dir=~no-such-user-komt/parts"], "checkpoint.dir: cannot expand '~no-such-user-komt'"),
    "response column named finish_reason": (
        lambda t: ["output.response_column=finish_reason"],
        "output.response_column: 'finish_reason' is one of the columns the job adds "
        "(finish_reason, stop_reason, prompt_tokens, completion_tokens, error, row_fingerprint); choose another name"),
    "response column named row_fingerprint": (
        lambda t: ["output.response_column=row_fingerprint"], "output.response_column: 'row_fingerprint' is one of the columns the job adds"),
    "id column named error": (lambda t: ["input.id_column=error"], "input.id_column: 'error' is a column the job writes"),
    "id column named as the response column": (
        lambda t: ["input.id_column=answer", "output.response_column=answer"],
        "input.id_column: 'answer' is a column the job writes (answer, finish_reason"),
    "an input column named prompt_tokens": (
        lambda t: (t / "in.jsonl").write_text('{"id": "a", "q": "x", "prompt_tokens": 3}\n') and [],
        "input.path: {t}/in.jsonl has a column 'prompt_tokens', one the output adds; rename it in the input"),
    "an input column named as the response column": (
        lambda t: ["output.response_column=q"], "output.response_column: the input already has a column 'q'; choose another name for the responses"),
}


@pytest.mark.parametrize("name", list(PATHS))
def test_a_path_problem_is_refused_before_the_model_loads(tmp_path, capsys, no_model, name):
    setup, fragment = PATHS[name]
    (tmp_path / "in.jsonl").write_text('{"id": "a", "q": "x"}\n')
    job = make_job(tmp_path, tmp_path / "in.jsonl", prompt={"template": TEMPLATE})
    args = setup(tmp_path)
    message = refusal(tmp_path, capsys, job, *args)
    assert message.startswith(f"{job}: "), message
    assert fragment.format(t=tmp_path) in message, message
