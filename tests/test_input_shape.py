"""The input's shape never makes a late failure, a traceback or an unreadable file (issue 20 class 2).

- Nesting: a column nests at most as deep as an output Parquet file that pyarrow, pandas and
  `datasets` read back (found by writing and reading one: lists + objects <= 62, 2 x lists + objects
  <= 98); deeper is refused in one line by validate and run, before anything is written.
- Type inference does not depend on where line 4096 (a JSONL batch) falls or how the input is split
  into files: objects that are empty at first and get keys later are one struct in every layout; a
  column of objects that never get keys is refused in every layout alike.
- A `datasets` feature Parquet cannot store (an empty struct) is refused by validate, before generation.
- Names that are not UTF-8 (an input file's, the job file's, output.path, checkpoint.dir) are refused
  in one line before anything is written."""

import json
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.cli import main
from batch.readers import input_files, read_files
from tests.conftest import komt, make_job
from tests.test_fidelity import no_model, tree  # noqa: F401 (no_model: a fixture)

TEMPLATE = "{q}"


def nested(kinds: str, leaf=1):
    """A value nested as KINDS says, outermost last: 'l' a list, 'o' an object {"k": ...}."""
    for kind in kinds:
        leaf = [leaf] if kind == "l" else {"k": leaf}
    return leaf


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def refusal(tmp_path, capsys, job, *args) -> str:
    """validate and run both refuse in one line with exit 2, before the model, writing nothing."""
    before = tree(tmp_path)
    messages = []
    for command in (["validate"], ["run", "--no-progress"]):
        code = main([command[0], str(job), *command[1:], *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("komt-batch: error: "), err
        messages.append(err[0])
    assert messages[0] == messages[1]
    assert tree(tmp_path) == before
    return messages[0].removeprefix("komt-batch: error: ")


def read_back(path: Path) -> None:
    """pyarrow, pandas and `datasets` all read the Parquet file."""
    pq.read_table(path)
    pd.read_parquet(path)
    datasets.Dataset.from_parquet(str(path), cache_dir=str(path.parent / "hf"), keep_in_memory=True)


# --- nesting ---------------------------------------------------------------------------------------

DEEPEST = {  # the deepest of each kind an output file holds and every reader reads back
    "49 lists": "l" * 49,
    "62 objects": "o" * 62,
    "31 lists in 31 objects": "lo" * 31,
    "36 lists in 26 objects": "l" * 36 + "o" * 26,
    "26 objects in 36 lists": "o" * 26 + "l" * 36,
}
TOO_DEEP = {  # one more: a file pyarrow, pandas or `datasets` could not read
    "50 lists": ("l" * 50, "here 50 lists and 0 objects"),
    "63 objects": ("o" * 63, "here 0 lists and 63 objects"),
    "32 lists in 32 objects": ("lo" * 32, "here 32 lists and 32 objects"),
    "37 lists in 25 objects": ("l" * 37 + "o" * 25, "here 37 lists and 25 objects"),
    "inside an object's key": ("l" * 50 + "o", "here 50 lists and 1 objects"),
    "200 objects": ("o" * 200, "here 0 lists and 200 objects"),
}


@pytest.mark.parametrize("name", list(DEEPEST))
def test_the_deepest_nesting_is_kept_and_read_back(tmp_path, name):
    src = jsonl(tmp_path / "in.jsonl", [{"q": "a", "t": nested(DEEPEST[name])}, {"q": "b", "t": None}])
    table = read_files([src]).table
    pq.write_table(table, tmp_path / "out.parquet")
    read_back(tmp_path / "out.parquet")
    assert pq.read_table(tmp_path / "out.parquet").column("t").to_pylist() == [nested(DEEPEST[name]), None]


@pytest.mark.parametrize("name", list(TOO_DEEP))
def test_nesting_deeper_than_the_output_holds_is_refused_at_its_line(tmp_path, capsys, no_model, name):
    kinds, here = TOO_DEEP[name]
    src = jsonl(tmp_path / "in.jsonl", [{"q": "a"}, {"q": "b", "t": nested(kinds)}])
    job = make_job(tmp_path, src, input={"id_column": None}, prompt={"template": TEMPLATE})
    assert refusal(tmp_path, capsys, job) == (
        f"{src}:2: column 't': lists and objects nested too deeply for the output ({here}; at most 62 levels, "
        "and 49 if all are lists: Parquet counts a list twice, up to 98)"
    )


@pytest.mark.parametrize("line", ['{"q": "b", "t": ' + "[" * 5000 + "]" * 5000 + "}", '{"q": "b", "t": ' + '{"k": ' * 500 + "1" + "}" * 501])
def test_nesting_deeper_than_python_reads_is_refused_alike(tmp_path, capsys, no_model, line):
    src = tmp_path / "in.jsonl"
    src.write_text('{"q": "a"}\n' + line + "\n")
    job = make_job(tmp_path, src, input={"id_column": None}, prompt={"template": TEMPLATE})
    assert refusal(tmp_path, capsys, job) == (
        f"{src}:2: lists or objects nested too deeply for the output (at most 62 levels, and 49 if all are lists: Parquet counts a list twice, up to 98)"
    )


def test_a_parquet_input_nested_deeper_than_datasets_reads_is_refused(tmp_path, capsys, no_model):
    """pyarrow writes and reads 63 nested structs; `datasets` cannot read them back: refused."""
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"q": ["a"], "t": [nested("o" * 63)]}), src)
    job = make_job(tmp_path, src, input={"id_column": None}, prompt={"template": TEMPLATE})
    assert refusal(tmp_path, capsys, job).startswith(f"{src}: column 't': lists and objects nested too deeply for the output (here 0 lists and 63 objects")


def test_the_deepest_nesting_survives_a_real_run(tmp_path):
    kinds = "l" * 36 + "o" * 26
    src = jsonl(tmp_path / "in.jsonl", [{"q": "안녕", "t": nested(kinds)}])
    job = make_job(tmp_path, src, input={"id_column": None}, prompt={"template": TEMPLATE}, generation={"max_new_tokens": 2})
    assert main(["run", str(job), "--no-progress"]) == 0
    out = tmp_path / "out" / "result.parquet"
    read_back(out)
    assert pq.read_table(out).column("t").to_pylist() == [nested(kinds)]
    assert main(["run", str(job), "--no-progress"]) == 0  # the rerun reads its own output: done, not foreign


# --- type inference in every layout ---------------------------------------------------------------

FIRST = 4096  # the JSONL reader's batch: rows before it and after it are typed in different batches
EMPTY_THEN_KEYS = [{"q": f"r{i}", "m": {}, "t": [{}], "n": 1} for i in range(FIRST)] + [{"q": "late", "m": {"k": 1}, "t": [{"k": "x"}], "n": 2.5}]
LAYOUTS = {  # name -> {file: rows}
    "one file, keys after line 4096": {"in/a.jsonl": EMPTY_THEN_KEYS},
    "one file, keys before line 4096": {"in/a.jsonl": EMPTY_THEN_KEYS[-10:]},
    "two files, keys in the second": {"in/a.jsonl": EMPTY_THEN_KEYS[:10], "in/b.jsonl": EMPTY_THEN_KEYS[10:]},
    "a file of empty objects only, then one with keys": {"in/a.jsonl": EMPTY_THEN_KEYS[:-1], "in/b.jsonl": EMPTY_THEN_KEYS[-1:]},
}


def expected_columns(rows: list[dict]) -> dict:
    return {
        "m": [{"k": r["m"].get("k")} for r in rows],
        "t": [[{"k": v.get("k")} for v in r["t"]] for r in rows],
        "n": [float(r["n"]) for r in rows],
    }


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_objects_that_get_keys_later_are_one_type_in_every_layout(tmp_path, layout):
    rows = []
    for name, file_rows in LAYOUTS[layout].items():
        jsonl(tmp_path / name, file_rows)
        rows += file_rows
    table = read_files(input_files(str(tmp_path / "in"))).table
    assert table.schema.field("m").type == pa.struct([("k", pa.int64())])
    assert table.schema.field("t").type == pa.list_(pa.struct([("k", pa.string())]))
    assert {c: table.column(c).to_pylist() for c in ("m", "t", "n")} == expected_columns(rows)
    pq.write_table(table, tmp_path / "out.parquet")
    assert pq.read_table(tmp_path / "out.parquet").select(["m", "t", "n"]).to_pylist() == table.select(["m", "t", "n"]).to_pylist()


ONLY_EMPTY = {  # name -> ({file: rows}, the column named)
    "one file": ({"in/a.jsonl": [{"q": "a", "m": {}}]}, "m"),
    "one file past line 4096": ({"in/a.jsonl": [{"q": "a", "m": {}}] * (FIRST + 1)}, "m"),
    "two files": ({"in/a.jsonl": [{"q": "a", "m": {}}], "in/b.jsonl": [{"q": "b", "m": None}, {"q": "c"}]}, "m"),
    "inside lists": ({"in/a.jsonl": [{"q": "a", "m": [{}]}] * (FIRST + 1)}, "m[]"),
    "inside an object": ({"in/a.jsonl": [{"q": "a", "m": {"k": {}}}], "in/b.jsonl": [{"q": "a", "m": {"j": 1}}]}, "m.k"),
}


@pytest.mark.parametrize("layout", list(ONLY_EMPTY))
def test_objects_that_never_get_keys_are_refused_in_every_layout(tmp_path, capsys, no_model, layout):
    files, column = ONLY_EMPTY[layout]
    for name, rows in files.items():
        jsonl(tmp_path / name, rows)
    job = make_job(tmp_path, tmp_path / "in", input={"id_column": None}, prompt={"template": TEMPLATE})
    assert refusal(tmp_path, capsys, job) == f"{tmp_path}/in/a.jsonl: column {column!r} holds only empty objects {{}}, which Parquet cannot store"


# --- datasets features that Parquet cannot store ---------------------------------------------------

@pytest.mark.parametrize(("column", "values", "named"), [
    ("m", [{}, {}], "m"),
    ("m", [{"k": {}}, {"k": None}], "m.k"),
    ("m", [[{}], []], "m[]"),
])
def test_a_datasets_feature_parquet_cannot_store_is_refused_before_generation(tmp_path, capsys, no_model, column, values, named):
    saved = tmp_path / "saved"
    ds = datasets.Dataset.from_dict({"q": ["a", "b"], column: values})
    ds.save_to_disk(str(saved))
    capsys.readouterr()  # (its progress bar)
    job = make_job(tmp_path, saved, input={"id_column": None}, prompt={"template": TEMPLATE})
    message = refusal(tmp_path, capsys, job)
    assert message.startswith(f"{saved}/") and message.endswith(f": column {named!r} holds only empty objects {{}}, which Parquet cannot store")


# --- names that are not UTF-8 ------------------------------------------------------------------------

BAD = "\udcff"  # the byte 0xff in a file name, as Python holds it


def test_an_input_files_name_that_is_not_utf8_is_refused(tmp_path, capsys, no_model):
    jsonl(tmp_path / "in" / f"a{BAD}.jsonl", [{"q": "a"}])
    jsonl(tmp_path / "in" / "b.jsonl", [{"q": "b"}])
    for path in (tmp_path / "in", tmp_path / "in" / "*.jsonl"):  # a folder's entry, a glob's match
        job = make_job(tmp_path, path, input={"id_column": None}, prompt={"template": TEMPLATE})
        assert refusal(tmp_path, capsys, job) == (
            f"{job}: input.path: {tmp_path}/in/a\\xff.jsonl: the file's name is not UTF-8 text (the checkpoint records it); rename the file"
        )
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "a.jsonl").symlink_to(tmp_path / "in" / f"a{BAD}.jsonl")  # what the plan records: the target
    job = make_job(tmp_path, tmp_path / "linked", input={"id_column": None}, prompt={"template": TEMPLATE})
    assert refusal(tmp_path, capsys, job) == (
        f"{job}: input.path: {tmp_path}/in/a\\xff.jsonl: the file's name is not UTF-8 text (the checkpoint records it); rename the file"
    )
    named = f"input.path={tmp_path}/in/a{BAD}.jsonl"  # named on the command line
    assert refusal(tmp_path, capsys, job, named) == (
        f"{job}: input.path: {tmp_path}/in/a\\xff.jsonl is not UTF-8 text (the output records it); choose a UTF-8 name "
        f"(set on the command line: input.path={tmp_path}/in/a\\xff.jsonl)"
    )


@pytest.mark.parametrize(("key", "value"), [
    ("output.path", f"out/r{BAD}.parquet"),
    ("output.path", f"out{BAD}/r.parquet"),
    ("checkpoint.dir", f"parts{BAD}"),
    ("input.reuse", f"old{BAD}/*.parquet"),
])
def test_an_output_name_that_is_not_utf8_is_refused(tmp_path, capsys, no_model, key, value):
    src = jsonl(tmp_path / "in.jsonl", [{"q": "a"}])
    job = make_job(tmp_path, src, input={"id_column": None}, prompt={"template": TEMPLATE})
    shown = value.replace(BAD, "\\xff")
    assert refusal(tmp_path, capsys, job, f"{key}={value}") == (
        f"{job}: {key}: {shown} is not UTF-8 text (the output records it); choose a UTF-8 name (set on the command line: {key}={shown})"
    )


def test_a_job_files_name_that_is_not_utf8_is_refused_by_the_cli(tmp_path):
    src = jsonl(tmp_path / "in.jsonl", [{"q": "a"}])
    job = make_job(tmp_path, src, name=f"job{BAD}.yaml", input={"id_column": None}, prompt={"template": TEMPLATE})
    for command in (["validate"], ["run", "--no-progress"], ["status"]):
        done = komt(command[0], job, *command[1:])
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr == f"komt-batch: error: {tmp_path}/job\\xff.yaml: the job file's name is not UTF-8 text (the output records it); rename the file\n"
    assert not (tmp_path / "out").exists()
