"""Input sources (issue 10): .jsonl.gz, `save_to_disk` folders and Hub datasets from the local cache,
all read as memory-mapped Arrow with the input contract of files (order, ids, columns and types, one
line refusals); the conversion cache of JSONL/Parquet; ids read from the table."""

import gzip
import json
import os
import shutil
import time
from pathlib import Path

import datasets
from datasets.naming import camelcase_to_snakecase
from datasets.packaged_modules.parquet.parquet import Parquet
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import readers
from batch.cli import main
from batch.config import load_job
from batch.errors import JobError
from batch.rows import RowIds, read_rows, row_ids
from tests.conftest import make_job, read_output

TEMPLATE = "Q: {q}"
TABLE = pa.table({"id": ["a", "b", "c"], "q": ["하나", "two", "셋"], "n": pa.array([1, None, 3], pa.int32()), "tags": [["x"], [], None]})


@pytest.fixture(autouse=True)
def caches(tmp_path_factory, monkeypatch):
    """The input cache and the Hugging Face datasets cache in temporary folders, away from tmp_path
    (whose tree the refusal tests compare)."""
    root = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "xdg"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "hf-datasets"))
    datasets.disable_progress_bars()
    return root


def hub_cache(cache_root: Path, name: str, splits: dict[str, pa.Table], config: str = "default") -> None:
    """What `load_dataset(name, config)` leaves in the cache after a download (Arrow files under
    <cache>/<org>___<name>/<config>/<version>/<hash>/ and dataset_info.json), made by datasets' own
    Parquet builder from local files, then moved under the org's name as a download would place it."""
    org, short = name.split("/")
    short = camelcase_to_snakecase(short)  # as the Hub's builder names it
    stage = cache_root / f"stage-{config}"
    for split, table in splits.items():
        stage.mkdir(exist_ok=True)
        pq.write_table(table, stage / f"{split}.parquet")

    builder = Parquet(
        cache_dir=str(stage / "cache"), dataset_name=short, config_name=config, config_id=config, hash="0123abcd",
        data_files={split: str(stage / f"{split}.parquet") for split in splits},
    )
    builder.download_and_prepare()
    target = Path(datasets.config.HF_DATASETS_CACHE) / f"{org}___{short}"
    target.mkdir(parents=True, exist_ok=True)
    shutil.move(stage / "cache" / short / config, target / config)
    shutil.rmtree(stage)


def job_for(tmp_path, **input_section):
    path = input_section.pop("path", None)
    input_section.setdefault("id_column", None)
    job = make_job(tmp_path, path or "", prompt={"template": TEMPLATE}, input=input_section)
    if path is None:  # input.dataset instead
        text = job.read_text().replace("  path: ''\n", "")
        job.write_text(text)
    return job


def read(job: Path):
    return read_rows(load_job(job))


def refused(tmp_path, capsys, job: Path) -> str:
    """validate and run refuse in one line, exit 2, writing nothing in tmp_path."""
    before = sorted(tmp_path.rglob("*"))
    messages = []
    for command in ("validate", "run"):
        assert main([command, str(job), *(["--no-progress"] if command == "run" else [])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("komt-batch: error: "), err
        messages.append(err[0].removeprefix("komt-batch: error: "))
    assert messages[0] == messages[1] and sorted(tmp_path.rglob("*")) == before
    return messages[0]


# --- save_to_disk folders and Hub datasets --------------------------------------------------------


def test_a_save_to_disk_folder_is_read_as_it_is(tmp_path):
    datasets.Dataset(TABLE).save_to_disk(str(tmp_path / "saved"), num_shards=2)
    rows = read(job_for(tmp_path, path=str(tmp_path / "saved"), id_column="id"))
    assert rows.table.select(TABLE.column_names).to_pylist() == TABLE.to_pylist()
    assert rows.table.schema.field("n").type == pa.int32()
    assert list(rows.ids) == ["a", "b", "c"]
    assert len(rows.files) > 1 and all(f.suffix == ".arrow" and f.parent == tmp_path / "saved" for f in rows.files)
    assert list(rows.slices()) == [(0, ["Q: 하나", "Q: two", "Q: 셋"])]


def test_a_saved_dataset_dict_needs_its_split(tmp_path, capsys):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset(TABLE), "test": datasets.Dataset(TABLE.slice(1))}).save_to_disk(str(saved))
    assert list(read(job_for(tmp_path, path=str(saved), split="test")).ids) == ["0", "1"]  # no id_column: positions in the split
    assert refused(tmp_path, capsys, job_for(tmp_path, path=str(saved), split="validation")).endswith(
        "job.yaml: input.split: 'validation' does not exist; splits: train, test")
    assert refused(tmp_path, capsys, job_for(tmp_path, path=str(saved))).endswith(
        f"job.yaml: input.split: required: {saved} has the splits train, test")


def test_a_hub_dataset_from_the_local_cache(tmp_path, caches):
    hub_cache(caches, "org/Prompts", {"train": TABLE, "test": TABLE.slice(2)})
    rows = read(job_for(tmp_path, dataset="org/Prompts", split="train", id_column="id"))
    assert rows.table.select(TABLE.column_names).to_pylist() == TABLE.to_pylist() and list(rows.ids) == ["a", "b", "c"]
    assert [f.name for f in rows.files] == ["prompts-train.arrow"]
    assert read(job_for(tmp_path, dataset="org/Prompts", split="test")).table.column("id").to_pylist() == ["c"]


def test_hub_dataset_refusals(tmp_path, capsys, caches):
    hub_cache(caches, "org/prompts", {"train": TABLE, "test": TABLE}, config="ko")
    hub_cache(caches, "org/prompts", {"train": TABLE}, config="en")
    cache = datasets.config.HF_DATASETS_CACHE
    cases = {
        ("org/other", "ko", "train"): f"input.dataset: org/other is not in the local Hugging Face cache (HF_DATASETS_CACHE={cache})",
        ("org/prompts", None, "train"): "input.config: required: the cache holds org/prompts in several configs (en, ko)",
        ("org/prompts", "ja", "train"): "input.config: 'ja' of org/prompts is not in the local Hugging Face cache; configs there: en, ko",
        ("org/prompts", "ko", "validation"): "input.split: 'validation' does not exist; splits: train, test",
        ("org/prompts", "ko", None): "input.split: required: org/prompts has the splits train, test",
        ("a/b/c", None, None): "input.dataset: 'a/b/c' is not a dataset id (name or org/name)",
    }
    for (name, config, split), message in cases.items():
        job = job_for(tmp_path, dataset=name, config=config, split=split)
        assert refused(tmp_path, capsys, job) == f"{job}: {message}"
    assert read(job_for(tmp_path, dataset="org/prompts", config="en")).table.num_rows == 3  # one split: no need to name it


def test_a_dataset_without_the_template_column(tmp_path, capsys):
    datasets.Dataset(TABLE.drop_columns(["q"])).save_to_disk(str(tmp_path / "saved"))
    job = job_for(tmp_path, path=str(tmp_path / "saved"))
    assert refused(tmp_path, capsys, job) == f"{job}: prompt.template: column 'q' is not in the input (columns: id, n, tags)"


def test_duplicate_ids_in_a_dataset_say_which_arrow_files(tmp_path, capsys):
    datasets.Dataset(pa.table({"id": ["a", "b", "c", "b"], "q": ["x"] * 4})).save_to_disk(str(tmp_path / "saved"), num_shards=2)
    job = job_for(tmp_path, path=str(tmp_path / "saved"), id_column="id")
    shards = sorted((tmp_path / "saved").glob("*.arrow"))
    assert refused(tmp_path, capsys, job) == (
        f"{job}: input.id_column: duplicate ids in the input (1), e.g. 'b'; 'b' is at {shards[0]} row 2 and {shards[1]} row 2"
    )


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"path": "in.jsonl", "dataset": "org/x"}, "input.path: name one of input.path and input.dataset, not both"),
        ({"path": "", "dataset": None}, "input.path: required"),
        ({"path": "in.jsonl", "config": "ko"}, "input.config: only for input.dataset"),
    ],
)
def test_input_keys_that_do_not_go_together(tmp_path, sections, message):
    job = make_job(tmp_path, "", input=sections)
    with pytest.raises(JobError, match=message):
        load_job(job)


def test_a_split_for_files_is_refused(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"id": "a", "q": "x"}\n')
    job = job_for(tmp_path, path=str(tmp_path / "in.jsonl"), split="train")
    assert refused(tmp_path, capsys, job) == f"{job}: input.split: only for input.dataset or a save_to_disk folder of a DatasetDict"


def test_a_real_run_on_a_hub_dataset_keeps_order_ids_and_columns(tmp_path, caches):
    hub_cache(caches, "org/prompts", {"train": TABLE})
    job = make_job(tmp_path, "", prompt={"template": TEMPLATE}, generation={"max_new_tokens": 2}, input={"dataset": "org/prompts"})
    job.write_text(job.read_text().replace("  path: ''\n", ""))
    assert main(["run", str(job), "--no-progress"]) == 0
    out = read_output(tmp_path / "out" / "result.parquet")
    assert [{k: r[k] for k in TABLE.column_names} for r in out] == TABLE.to_pylist()
    assert pq.read_schema(tmp_path / "out" / "result.parquet").field("n").type == pa.int32()
    assert all(r["finish_reason"] in ("stop", "eos", "length") for r in out)


# --- .jsonl.gz ------------------------------------------------------------------------------------


def test_jsonl_gz_is_read_like_jsonl(tmp_path, capsys):
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TABLE.to_pylist())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "d" / "b.jsonl").write_text(lines)
    table = read(job_for(tmp_path, path=str(tmp_path / "d"))).table
    assert table.column("q").to_pylist() == ["하나", "two", "셋"] * 2
    assert table.schema.field("n").type == pa.int64()  # JSONL integers
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"q": "a"}\n{"q": \n'))
    with pytest.raises(JobError, match=r"bad.jsonl.gz:2: not valid JSON"):
        readers.read_files([tmp_path / "bad.jsonl.gz"])
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines.encode() * 50)[:60])
    with pytest.raises(JobError, match=r"cut.jsonl.gz: cannot read \(Compressed file ended"):
        readers.read_files([tmp_path / "cut.jsonl.gz"])


# --- the conversion cache -------------------------------------------------------------------------


def entries(caches) -> list[str]:
    folder = caches / "xdg" / "komt-batch" / "inputs"
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".arrow") if folder.exists() else []


def test_files_are_converted_once_and_again_when_they_change(tmp_path, caches, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "q": "x"}\n')
    assert readers.read_files([src]).table.num_rows == 1 and entries(caches) == []  # just written: not kept
    monkeypatch.setattr(readers, "FRESH_NS", 0)
    first = readers.read_files([src]).table
    assert entries(caches) and len(entries(caches)) == 1
    with monkeypatch.context() as m:
        m.setattr(readers, "_convert", lambda *a: pytest.fail("converted again"))
        assert readers.read_files([src]).table.equals(first)
    src.write_text('{"id": "a", "q": "y"}\n')  # same size, new content
    assert readers.read_files([src]).table.column("q").to_pylist() == ["y"]
    assert len(entries(caches)) == 2


def test_unused_entries_are_evicted(tmp_path, caches, monkeypatch):
    monkeypatch.setattr(readers, "FRESH_NS", 0)
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text('{"q": "x"}\n')
    readers.read_files([tmp_path / "a.jsonl"])
    (old,) = entries(caches)
    folder = caches / "xdg" / "komt-batch" / "inputs"
    stale = time.time() - (readers.CACHE_DAYS + 1) * 86400
    os.utime(folder / old, (stale, stale))
    readers.read_files([tmp_path / "b.jsonl"])
    assert old not in entries(caches) and len(entries(caches)) == 1


def test_a_refused_input_leaves_no_entry(tmp_path, caches, monkeypatch):
    monkeypatch.setattr(readers, "FRESH_NS", 0)
    (tmp_path / "in.jsonl").write_text('{"q": "x"}\n{"q": 1}\n')
    with pytest.raises(JobError, match="in.jsonl:2: column 'q': integers where earlier values are strings"):
        readers.read_files([tmp_path / "in.jsonl"])
    folder = caches / "xdg" / "komt-batch" / "inputs"
    assert sorted(p.suffix for p in folder.iterdir()) == [".lock"]


# --- ids --------------------------------------------------------------------------------------------


def test_row_ids_in_any_order_of_access():
    n = 3 * RowIds.BLOCK + 5
    t = pa.Table.from_batches(
        [pa.record_batch({"id": list(range(s, min(s + 1000, n)))}) for s in range(0, n, 1000)]
    )
    ids, expected = row_ids(t, "id", "job"), [str(i) for i in range(n)]
    assert len(ids) == n and list(ids) == expected
    assert [ids[i] for i in (n - 1, 5, 4096, RowIds.BLOCK, 0, -1)] == [expected[i] for i in (n - 1, 5, 4096, RowIds.BLOCK, 0, -1)]
    assert ids[100:9000] == expected[100:9000] and ids[::5000] == expected[::5000]
    with pytest.raises(IndexError):
        ids[n]
    positions = row_ids(t, None, "job")
    assert positions[n - 1] == str(n - 1) and positions[10:12] == ["10", "11"]


def test_duplicate_ids_found_far_apart():
    n = 50_000
    values = [f"id-{i}" for i in range(n)]
    values[40_000], values[49_999] = "id-7", "id-123"
    with pytest.raises(JobError, match=r"duplicate ids in the input \(2\), e.g. 'id-7', 'id-123'"):
        row_ids(pa.table({"id": values}), "id", "job")
