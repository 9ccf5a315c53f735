"""Checkpoints that can be trusted: only the job's own files are deleted, a checkpoint directory
that is not the job's alone is refused, a part is used only if it verifies against the plan (else
set aside and its rows redone), the two run modes exclude each other, and a damaged checkpoint is
named in one line and recovered by --restart. Real files, re-read; outputs compared with an
uninterrupted run."""

import json
import shutil
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.cli import main
from tests.conftest import (
    input_rows,
    make_job,
    one_line,
    parts,
    start,
    wait_generating,
    write_jsonl,
)

OPTS = dict(generation={"max_new_tokens": 4}, batching={"max_batch_size": 2}, checkpoint={"every_rows": 2, "keep": True})


def rows(n: int) -> list[dict]:
    return input_rows(n, "t", " 왜", 3)


def run(*args) -> int:
    return main(["run", *map(str, args), "--no-progress"])


def tree(path) -> dict:
    """Every file under path with its bytes, to prove that nothing was touched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One input for the module, a finished run of it with its checkpoint kept (3 parts of 2 rows),
    and the parts of runs of the same input with another setting and without the adapter."""
    root = tmp_path_factory.mktemp("shared")
    src = write_jsonl(root / "in.jsonl", rows(6))
    runs = {"reference": [], "other settings": ["generation.max_new_tokens=3"], "other model": ["model.adapter=null"]}
    for name, overrides in runs.items():
        job = make_job(root, src, name.replace(" ", "-") + ".yaml", output={"path": str(root / name / "r.parquet")}, **OPTS)
        assert run(job, *overrides) == 0
    return src, root


@pytest.fixture
def finished(tmp_path, shared, capsys):
    """A copy of the finished run (same input file, so its checkpoint is this job's): job, output,
    parts, the output's table."""
    src, root = shared
    shutil.copytree(root / "reference", tmp_path / "out")
    out = tmp_path / "out" / "r.parquet"
    job = make_job(tmp_path, src, output={"path": str(out)}, **OPTS)
    capsys.readouterr()
    files = parts(out)
    assert len(files) == 3 and all(pq.read_metadata(p).num_rows == 2 for p in files)
    return job, out, files, pq.read_table(out)


# --- 1. delete only what the job wrote ------------------------------------------------------------


def test_files_beside_the_checkpoint_survive_finish_and_restart(tmp_path, shared, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    shutil.copy(shared[0], out_dir / "in.jsonl")  # the job's own input, beside its output
    pq.write_table(pa.table({"id": ["old"]}), out_dir / "last-week.parquet")
    (out_dir / "notes.txt").write_text("mine")
    (out_dir / ".other.parquet.x1y2.tmp").write_text("another program's temporary file")
    beside = tree(out_dir)
    ckpt = out_dir / "ckpt"  # a checkpoint directory of its own, beside them
    job = make_job(tmp_path, out_dir / "in.jsonl", **{**OPTS, "checkpoint": {"every_rows": 2, "dir": str(ckpt)}})
    assert run(job) == 0
    assert not ckpt.exists()  # finished: the job's own files and their directory are gone ...
    assert run(job, "--restart", "checkpoint.keep=true") == 0
    assert (ckpt / "manifest.json").exists()  # (kept, as asked)
    now = tree(out_dir)
    assert {k: now[k] for k in beside} == beside  # ... and every file beside them is still there, unchanged
    assert sorted(now) == sorted([*beside, "result.parquet", "result.summary.json", *(f"ckpt/{p.name}" for p in ckpt.iterdir())])


def foreign_file(t):
    (t / "ckpt").mkdir()
    (t / "ckpt" / "notes.txt").write_text("mine")
    return {"checkpoint": {"dir": str(t / "ckpt")}}, "holds files komt-batch did not write (notes.txt)"


def last_weeks_output(t):
    (t / "ckpt").mkdir()
    pq.write_table(pa.table({"id": ["old"]}), t / "ckpt" / "annotated-2026-11-20.parquet")
    return {"checkpoint": {"dir": str(t / "ckpt")}}, "annotated-2026-11-20.parquet"


def a_subdirectory(t):
    (t / "ckpt" / "sub").mkdir(parents=True)
    return {"checkpoint": {"dir": str(t / "ckpt")}}, "did not write (sub)"


def a_lookalike(t):
    (t / "ckpt").mkdir()
    (t / "ckpt" / "part-notes.txt").write_text("mine")
    (t / "ckpt" / "manifest.json.bak").write_text("mine")
    return {"checkpoint": {"dir": str(t / "ckpt")}}, "did not write (manifest.json.bak, part-notes.txt)"


def holds_the_output(t):
    return {"checkpoint": {"dir": str(t / "out")}}, "it holds the output"


def holds_the_input(t):
    src = write_jsonl(t / "data" / "in.jsonl", rows(3))
    return {"checkpoint": {"dir": str(t / "data")}, "input": {"path": str(src)}}, "it holds the input file"


def is_the_input_directory(t):
    write_jsonl(t / "inputs" / "a.jsonl", rows(3))
    return {"checkpoint": {"dir": str(t / "inputs")}, "input": {"path": str(t / "inputs")}}, "it holds the input file"


def is_a_file(t):
    (t / "ckpt").write_text("mine")
    return {"checkpoint": {"dir": str(t / "ckpt")}}, "is a file, not a directory"


@pytest.mark.parametrize(
    "case", [foreign_file, last_weeks_output, a_subdirectory, a_lookalike, holds_the_output, holds_the_input, is_the_input_directory, is_a_file]
)
def test_a_checkpoint_dir_that_is_not_the_jobs_alone_is_refused(tmp_path, capsys, case):
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    sections, fragment = case(tmp_path)
    job = make_job(tmp_path, src, **{**OPTS, **sections})
    before = tree(tmp_path)
    for args in ([], ["--restart"]):
        assert run(job, *args) == 2
        line = one_line(capsys)
        assert "checkpoint.dir" in line and fragment in line, line
    assert main(["validate", str(job)]) == 2
    assert fragment in one_line(capsys)
    assert tree(tmp_path) == before  # nothing deleted, nothing written


def test_stale_temporaries_are_cleaned_on_the_next_run(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows(6))
    job = make_job(tmp_path, src, **OPTS)
    ckpt = tmp_path / "out" / "result.parquet.parts"
    assert main(["plan", str(job)]) == 0  # the checkpoint, with its token: its temporaries carry it
    token = json.loads((ckpt / "checkpoint.json").read_text())["token"]
    left = [ckpt / f".part-0-of-2-000003-deadbeef.parquet.{token}-k2j4h5ab.tmp", ckpt / f".manifest.json.{token}-abc123de.tmp",
            ckpt / f".part-1-of-2-000001-cafe0001.parquet.{token}-zz000000.tmp", ckpt / f".part-0-of-1-000002-0b0b0b0b.parquet.{token}-x_y00000.tmp",
            tmp_path / "out" / f".result.parquet.{token}-q1w2e3r4.tmp", tmp_path / "out" / f".result.summary.json.{token}-r4t5y6u7.tmp"]
    for p in left:
        p.write_bytes(b"torn by a kill")
    sort_runs = tmp_path / "out" / f".result.parquet.{token}-a1b2c3d4.sort.tmp"  # the final file's sort runs, torn
    sort_runs.mkdir()
    (sort_runs / "run-00000.arrow").write_bytes(b"torn")
    (tmp_path / "out" / ".other.parquet.q1w2e3.tmp").write_text("not the job's")
    (tmp_path / "out" / ".result.parquet.q1w2e3r4.tmp").write_text("not the job's: no token")
    users = tmp_path / "out" / f".result.parquet.{token}-zzzzzzzz.tmp"  # a folder by that name: never the job's
    users.mkdir()
    (users / "mine.txt").write_text("not the job's")
    # a shard removes only its own temporaries (another shard may be writing its own), and the
    # plan's under the plan lock
    assert run(job, "--shard", "0/2") == 0
    assert [p.exists() for p in left] == [False, True, True, True, True, True]
    assert run(job, "--shard", "1/2") == 0
    assert [p.exists() for p in left] == [False, True, False, True, True, True]
    # the exclusive holder of the job lock (an unsharded run, or merge) removes them all
    assert main(["merge", str(job)]) == 0
    assert not any(p.exists() for p in left) and not sort_runs.exists()
    assert (tmp_path / "out" / ".other.parquet.q1w2e3.tmp").read_text() == "not the job's"
    assert (tmp_path / "out" / ".result.parquet.q1w2e3r4.tmp").read_text() == "not the job's: no token"
    assert (users / "mine.txt").read_text() == "not the job's"
    assert not list(ckpt.glob(".*")) and pq.read_table(tmp_path / "out" / "result.parquet").num_rows == 6


# --- 2. a part is used only if it belongs to this plan ----------------------------------------------


def foreign_settings(tmp_path, root, victim):
    return shutil.copy(min(root.glob("other settings/r.parquet.parts/part-*")), victim.with_name("part-0-of-1-000001-00000000.parquet"))


def foreign_model(tmp_path, root, victim):
    return shutil.copy(min(root.glob("other model/r.parquet.parts/part-*")), victim.with_name("part-0-of-1-000001-00000000.parquet"))


def forged_plan_id(tmp_path, root, victim):
    """Another run's part that claims this plan's id: its rows' fingerprints still give it away."""
    ours = json.loads(pq.read_schema(victim).metadata[b"komt_batch_part"])
    foreign = pq.read_table(min(root.glob("other settings/r.parquet.parts/part-*")))
    path = victim.with_name("part-0-of-1-000001-00000000.parquet")
    pq.write_table(foreign.replace_schema_metadata({"komt_batch_part": json.dumps(ours)}), path)
    return path


def tampered_row(tmp_path, root, victim):
    """One of our parts, with a row moved to another row's place."""
    t = pq.read_table(victim)
    rows_col = t.column("row").to_pylist()
    moved = t.set_column(0, "row", pa.array([(rows_col[0] + 1) % 6, *rows_col[1:]], pa.int64()))
    path = victim.with_name("part-0-of-1-000001-00000000.parquet")
    pq.write_table(moved, path)
    return path


def torn(tmp_path, root, victim):
    data = victim.read_bytes()
    path = victim.with_name("part-0-of-1-000001-00000000.parquet")
    path.write_bytes(data[: len(data) // 2])
    return path


def not_results(tmp_path, root, victim):
    path = victim.with_name("part-0-of-1-000001-00000000.parquet")
    pq.write_table(pa.table({"row": [0, 1], "text": ["a", "b"]}), path)
    return path


@pytest.mark.parametrize("case", [foreign_settings, foreign_model, forged_plan_id, tampered_row, torn, not_results])
def test_a_part_that_does_not_verify_is_set_aside_and_its_rows_redone(tmp_path, capsys, shared, finished, case):
    job, out, parts, reference = finished
    out.unlink()
    victim = parts[1]
    bad = case(tmp_path, shared[1], victim)
    victim.unlink()  # its rows now exist only in the bad part
    assert run(job) == 0
    captured = capsys.readouterr()
    assert f"set aside {bad.name}" in captured.err and "its rows will be redone" in captured.err
    assert "generated_rows            2" in captured.out  # exactly the rows the bad part claimed
    assert pq.read_table(out).equals(reference)
    assert bad.with_name(bad.name + ".rejected").exists() and not bad.exists()


def test_renamed_and_duplicated_parts_are_used_by_their_content(tmp_path, capsys, finished):
    job, out, parts, reference = finished
    out.unlink()
    parts[0].rename(parts[0].with_name("part-7-of-9-000042-renamed1.parquet"))
    shutil.copy(parts[2], parts[2].with_name("part-0-of-1-999999-copy0001.parquet"))
    assert run(job) == 0
    captured = capsys.readouterr()
    assert "generated_rows            0" in captured.out and "set aside" not in captured.err
    assert pq.read_table(out).equals(reference)


def test_without_a_manifest_leftover_parts_are_not_adopted(tmp_path, capsys, finished):
    job, out, _, reference = finished
    out.unlink()
    (out.with_name("r.parquet.parts") / "manifest.json").unlink()
    assert run(job) == 0
    captured = capsys.readouterr()
    assert captured.err.count("set aside part-") == 3 and "of another plan" in captured.err
    assert "generated_rows            6" in captured.out
    assert pq.read_table(out).equals(reference)


def test_unsharded_and_sharded_runs_of_one_output_exclude_each_other(tmp_path, capsys):
    """A real run holds the job lock; it is paused (SIGSTOP) while the others try, so that it is
    surely still running then."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(16))
    job = make_job(tmp_path, src, generation={"max_new_tokens": 8}, batching={"max_batch_size": 2}, checkpoint={"every_rows": 2})
    shard0 = start(job, "--shard", "0/2")
    wait_generating(shard0)
    shard0.send_signal(signal.SIGSTOP)
    assert run(job) == 2  # unsharded, while a shard runs
    assert "another komt-batch process is running this job" in one_line(capsys)
    assert run(job, "--shard", "0/2") == 2  # the same shard twice
    assert "running shard 0/2" in one_line(capsys)
    assert main(["merge", str(job)]) == 2
    assert "another komt-batch process is running this job" in one_line(capsys)
    assert run(job, "--shard", "1/2") == 0  # the other shard runs beside it
    capsys.readouterr()
    shard0.send_signal(signal.SIGCONT)
    assert shard0.wait(timeout=120) == 0
    shard0.stderr.close(), shard0.stdout.close()

    whole = start(job, "--restart")  # and the other way round
    wait_generating(whole)
    whole.send_signal(signal.SIGSTOP)
    for args in (["--shard", "1/2"], ["--shard", "0/3"]):
        assert run(job, *args) == 2
        assert "another komt-batch process is running this job unsharded, or merging it" in one_line(capsys)
    whole.send_signal(signal.SIGCONT)
    assert whole.wait(timeout=120) == 0
    whole.stderr.close(), whole.stdout.close()
    assert pq.read_table(tmp_path / "out" / "result.parquet").num_rows == 16


# --- 5. a damaged checkpoint is recoverable -----------------------------------------------------------


def edit_manifest(change):
    def damage(ckpt):
        m = json.loads((ckpt / "manifest.json").read_text())
        (ckpt / "manifest.json").write_text(json.dumps(change(m)))
    return damage


def remove_key(key):
    def change(m):
        m.pop(key)
        return m
    return change


DAMAGE = {
    "manifest not JSON": (lambda c: (c / "manifest.json").write_bytes(b"\x00\xffgarbage{"), "manifest.json is not valid JSON"),
    "manifest empty": (lambda c: (c / "manifest.json").write_bytes(b""), "manifest.json is not valid JSON"),
    "manifest a list": (lambda c: (c / "manifest.json").write_text("[1, 2]"), "manifest.json is not a JSON object"),
    "manifest lacks chunks": (edit_manifest(remove_key("chunks")), "manifest.json lacks chunks"),
    "manifest lacks input": (edit_manifest(remove_key("input")), "manifest.json lacks input"),
    "manifest edited": (edit_manifest(lambda m: {**m, "planned_rows": 3}), "manifest.json does not match its plan_id"),
    "manifest of format 1": (edit_manifest(lambda m: {**m, "format": 1}), "manifest.json is of format 1"),
    "manifest emptied to {}": (lambda c: (c / "manifest.json").write_text("{}"), "manifest.json has no format (it is not komt-batch's, or it was emptied)"),
    "plan missing": (lambda c: (c / "plan.parquet").unlink(), "plan.parquet is missing"),
    "plan garbage": (lambda c: (c / "plan.parquet").write_bytes(b"PAR1" + b"\x07" * 300), "plan.parquet is unreadable"),
    "settled missing": (lambda c: (c / "settled.parquet").unlink(), "settled.parquet is missing or unreadable"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_in_one_line_and_restart_recovers(tmp_path, capsys, finished, name):
    job, out, _, reference = finished
    out.unlink()
    damage, fragment = DAMAGE[name]
    ckpt = out.with_name("r.parquet.parts")
    damage(ckpt)
    for command in (["validate", str(job)], ["run", str(job), "--no-progress"], ["status", str(job)], ["merge", str(job)]):
        assert main(command) == 2  # (validate too: it checks what run checks)
        line = one_line(capsys)
        assert "the checkpoint is damaged" in line and fragment in line and "--restart" in line, line
    assert not out.exists()
    assert run(job, "--restart") == 0
    assert "generated_rows            6" in capsys.readouterr().out
    assert pq.read_table(out).equals(reference)


def test_status_and_merge_with_a_damaged_part(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    job = make_job(tmp_path, src, **OPTS)
    assert run(job, "--shard", "0/2") == 0 and run(job, "--shard", "1/2") == 0
    part = parts(tmp_path / "out" / "result.parquet")[0]
    part.write_bytes(b"garbage")
    capsys.readouterr()
    assert main(["status", str(job)]) == 0  # status only reads: it names the part, moves nothing
    assert "parts_set_aside_next_run" in capsys.readouterr().out and part.exists()
    assert main(["merge", str(job)]) == 1
    err = capsys.readouterr().err
    assert f"set aside {part.name}" in err and "cannot merge yet" in err and "Traceback" not in err
    assert run(job, "--shard", "0/2") == 0 and run(job, "--shard", "1/2") == 0  # the owner redoes the rows
    assert main(["merge", str(job)]) == 0
    assert pq.read_table(tmp_path / "out" / "result.parquet").num_rows == 4
