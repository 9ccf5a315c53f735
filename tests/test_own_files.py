"""The job's own files are never its input, and only the job's own files are ever deleted -- known
by their content (checkpoint.json's token, the temporary files' names that carry it), not by their
names. Real runs, real files, re-read; outputs compared with an uninterrupted run."""

import json
import shlex
import signal
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.cli import main
from tests.conftest import input_rows, komt, make_job, one_line, start, start_paused, summary, wait_generating, write_jsonl

OPTS = dict(generation={"max_new_tokens": 8}, batching={"max_batch_size": 2}, checkpoint={"every_rows": 2})


def rows(n: int) -> list[dict]:
    return input_rows(n, "o", " 잘", 3)


def run(*args) -> int:
    return main(["run", *map(str, args), "--no-progress"])


def tree(path) -> dict:
    """Every file under path with its bytes (a folder: None), to prove that nothing was touched."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The output of an uninterrupted run of 12 rows (jsonl and Parquet inputs of the same rows)."""
    root = tmp_path_factory.mktemp("reference")
    src = write_jsonl(root / "in.jsonl", rows(12))
    pq.write_table(pa.Table.from_pylist(rows(12)), root / "in.parquet")
    out = {}
    for kind in ("jsonl", "parquet"):
        job = make_job(root, root / f"in.{kind}", f"{kind}.yaml", output={"path": str(root / kind / "r.parquet")}, **OPTS)
        assert run(job) == 0
        out[kind] = pq.read_table(root / kind / "r.parquet")
    return out


# --- 3. the job's own files are never its input --------------------------------------------------------
# (input.path, output.path, the input's kind), relative to the test's folder


LAYOUTS = {
    "the output in the input directory": ("data", "data/r.parquet", "jsonl"),
    "the output matched by the input's glob": ("data/*", "data/r.parquet", "jsonl"),
    "a ** glob over the checkpoint": ("data/**/*.parquet", "data/out/r.parquet", "parquet"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_jobs_own_output_and_checkpoint_are_left_out_of_the_input(tmp_path, reference, layout):
    """Interrupted after a part is committed (SIGTERM), resumed with the printed command, then run,
    validated and inspected again: every time the same input, the job's own files left out."""
    pattern, output, kind = LAYOUTS[layout]
    data = tmp_path / "data" / "in"
    data.mkdir(parents=True)
    if kind == "jsonl":
        write_jsonl(tmp_path / "data" / "in.jsonl", rows(12))
    else:
        pq.write_table(pa.Table.from_pylist(rows(12)), data / "in.parquet")
    out = tmp_path / output
    job = make_job(tmp_path, tmp_path / pattern, output={"path": str(out)}, **OPTS)
    proc, lines = start_paused(job, 4, tmp_path)  # 4 rows finished, so 2 parts committed: the resume reads the checkpoint
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    err = "".join(lines) + proc.communicate(timeout=120)[1]
    assert proc.returncode == 75, err
    assert list(tmp_path.rglob("part-*.parquet")), err
    assert err.count("they are left out of the input") == 1, err  # said once, at the first run
    words = shlex.split(err.split("To resume, run: ")[1].strip())
    resumed = komt(*words[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert int(summary(resumed.stdout)["resumed_rows"]) > 0
    assert pq.read_table(out).equals(reference[kind])
    for command in ("validate", "status", "run"):
        p = komt(command, job)
        assert p.returncode == 0 and summary(p.stdout)["state"] == "done", (command, p.stdout, p.stderr)
    assert pq.read_table(out).equals(reference[kind])


# --- 4. only the job's own files are deleted ---------------------------------------------------------------


def lookalikes(folder):
    """A user's folder that holds files named as the job's."""
    folder.mkdir()
    pq.write_table(pa.table({"id": ["mine"]}), folder / "plan.parquet")
    (folder / "manifest.json").write_text('{"mine": true}')
    (folder / "job.lock").write_text("mine")
    return "job.lock, manifest.json, plan.parquet"


def a_part_lookalike(folder):
    folder.mkdir()
    pq.write_table(pa.table({"row": [0], "response": ["mine"]}), folder / "part-0-of-1-000001-abcdef12.parquet")
    return "part-0-of-1-000001-abcdef12.parquet"


def a_forged_marker(folder):
    """checkpoint.json that komt-batch did not write, beside a lookalike."""
    folder.mkdir()
    (folder / "checkpoint.json").write_text('{"mine": true}')
    (folder / "settled.parquet").write_text("mine")
    return "checkpoint.json, settled.parquet"


@pytest.mark.parametrize("case", [lookalikes, a_part_lookalike, a_forged_marker])
def test_a_users_folder_with_the_jobs_names_is_not_a_checkpoint(tmp_path, capsys, case):
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    names = case(tmp_path / "mine")
    job = make_job(tmp_path, src, **{**OPTS, "checkpoint": {"every_rows": 2, "dir": str(tmp_path / "mine")}})
    before = tree(tmp_path)
    for command in (["run", str(job), "--no-progress"], ["run", str(job), "--restart", "--no-progress"], ["validate", str(job)], ["status", str(job)], ["merge", str(job)]):
        assert main(command) == 2, command
        line = one_line(capsys)
        assert f"did not write ({names})" in line and "checkpoint.dir" in line, line
        assert "--restart" not in line and "damaged" not in line, line  # (restart would not help: it is not the job's)
    assert tree(tmp_path) == before  # nothing overwritten, nothing deleted


def a_folder(out_dir):
    folder = out_dir / ".r.parquet.abcd1234.tmp"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")


def a_file(out_dir):
    (out_dir / ".r.parquet.abcd1234.tmp").write_text("mine")


def a_summary_file(out_dir):
    (out_dir / ".r.summary.json.zz99xx88.tmp").write_text("mine")


def a_sort_folder(out_dir):
    folder = out_dir / ".r.parquet.abcd1234.sort.tmp"
    folder.mkdir()
    (folder / "run-00000.arrow").write_text("mine")


@pytest.mark.parametrize("case", [a_folder, a_file, a_summary_file, a_sort_folder])
def test_a_users_temporary_looking_files_beside_the_output_survive(tmp_path, capsys, reference, case):
    src = write_jsonl(tmp_path / "in.jsonl", rows(12))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    case(out_dir)
    before = tree(out_dir)
    job = make_job(tmp_path, src, output={"path": str(out_dir / "r.parquet")}, **OPTS)
    assert run(job) == 0
    assert run(job, "--restart") == 0
    after = tree(out_dir)
    assert {k: after.get(k) for k in before} == before
    assert sorted(after) == sorted([*before, "r.parquet", "r.summary.json"])  # (no lock, no checkpoint left)
    assert pq.read_table(out_dir / "r.parquet").equals(reference["jsonl"])


def test_one_output_is_one_job_whatever_its_checkpoint_dir(tmp_path, capsys, reference):
    """Two runs of one output with two checkpoint directories: the second is refused while the
    first runs (paused with SIGSTOP, so that it surely still runs), and writes nothing; the first
    finishes with the exact output."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(12))
    out = tmp_path / "out" / "r.parquet"
    first = make_job(tmp_path, src, "first.yaml", output={"path": str(out)}, **{**OPTS, "checkpoint": {"every_rows": 2, "dir": str(tmp_path / "c1")}})
    second = make_job(tmp_path, src, "second.yaml", output={"path": str(out)}, **{**OPTS, "checkpoint": {"every_rows": 2, "dir": str(tmp_path / "c2")}})
    proc = start(first, stdout=subprocess.DEVNULL)
    wait_generating(proc)
    proc.send_signal(signal.SIGSTOP)
    try:
        assert run(second) == 2
        assert "another komt-batch process is running this job" in one_line(capsys)
        assert not (tmp_path / "c2").exists()  # refused before it wrote anything
    finally:
        proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    proc.stderr.close()
    assert pq.read_table(out).equals(reference["jsonl"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.parquet", "r.summary.json"]


def test_the_output_lock_outlives_a_shard_while_another_runs(tmp_path, capsys):
    """A shard started with --restart (it takes the lock alone to clear the checkpoint, then shares
    it) ends while another shard runs (paused with SIGSTOP): the lock file stays, so an unsharded
    run of the output is still refused; the last holder removes it."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(12))
    job = make_job(tmp_path, src, **OPTS)
    first = start(job, "--shard", "0/2", "--restart", stdout=subprocess.DEVNULL)
    wait_generating(first)
    second = start(job, "--shard", "1/2", stdout=subprocess.DEVNULL)
    wait_generating(second)
    second.send_signal(signal.SIGSTOP)
    try:
        assert first.wait(timeout=300) == 0, first.stderr.read()
        assert run(job) == 2
        assert "another komt-batch process is running this job" in one_line(capsys)
    finally:
        second.send_signal(signal.SIGCONT)
    assert second.wait(timeout=300) == 0, second.stderr.read()
    first.stderr.close(), second.stderr.close()
    assert main(["merge", str(job)]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["result.parquet", "result.summary.json"]


def test_a_checkpoint_of_the_previous_version_is_the_jobs_and_restart_clears_it(tmp_path, capsys, reference):
    """A checkpoint that komt-batch wrote before checkpoint.json (manifest format 2, no stop_reason in
    its parts): the job's own by its manifest, so `run` says it is of another version and advises
    --restart, and --restart clears it and writes the uninterrupted run's file."""
    from batch.checkpoint import plan_id

    src = write_jsonl(tmp_path / "in.jsonl", rows(12))
    job = make_job(tmp_path, src, **OPTS)
    assert main(["plan", str(job)]) == 0
    ckpt = next((tmp_path / "out").glob("*.parts"))
    (ckpt / "checkpoint.json").unlink()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["format"] = 2
    manifest["plan_id"] = plan_id(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert run(job) != 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "format 2, not 3" in line and "--restart" in line, line
    assert run(job, "--restart") == 0
    assert pq.read_table(tmp_path / "out" / "result.parquet").equals(reference["jsonl"])
    assert not ckpt.exists()
