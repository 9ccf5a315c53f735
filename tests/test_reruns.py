"""Reruns and resumes do what the user means: a finished job is left alone, a changed one is refused
until --restart, the message after an interruption gives a command that really resumes (wherever
{date}, {time}, {job_id} came from), --date/--time/--shards/--run-id are checked, and every file is
created with the user's umask."""

import json
import os
import shlex
import signal
import stat
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import runner
from batch.cli import main
from tests.conftest import (
    ROOT,
    cli_env,
    input_rows,
    komt,
    make_job,
    one_line,
    start,
    summary,
    write_jsonl,
)


def rows(n: int) -> list[dict]:
    return input_rows(n, "u", " 다시", 3)


OPTS = dict(generation={"max_new_tokens": 8}, batching={"max_batch_size": 2}, checkpoint={"every_rows": 2})


def test_greedy_outputs_do_not_depend_on_the_sampling_settings(tmp_path, capsys):
    """With do_sample false the next token is the raw logits' argmax: temperature, top_p, top_k and
    seed change no output, so a finished greedy output stays done and a stopped one resumes when only
    they change; with sampling on, a new seed is other outputs (refused until --restart)."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    job = make_job(tmp_path, src, generation={"max_new_tokens": 8, "do_sample": False}, batching={"max_batch_size": 2}, checkpoint={"every_rows": 2})
    out = tmp_path / "out" / "result.parquet"
    sampling_only = ["generation.seed=9", "generation.temperature=0.3", "generation.top_p=0.5", "generation.top_k=7"]
    assert main(["run", str(job), "--no-progress"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["run", str(job), "--no-progress", *sampling_only]) == 0
    assert summary(capsys.readouterr().out)["state"] == "done" and out.read_bytes() == before
    assert main(["status", str(job), *sampling_only]) == 0 and summary(capsys.readouterr().out)["state"] == "done"
    assert main(["run", str(job), "--no-progress", "--restart", *sampling_only]) == 0  # (regenerated: the same rows)
    assert out.read_bytes() != before and pq.read_table(out).drop_columns(["row_fingerprint"]).equals(pq.read_table(pa.BufferReader(before)).drop_columns(["row_fingerprint"]))
    capsys.readouterr()
    assert main(["run", str(job), "--no-progress", "generation.max_new_tokens=6"]) == 2  # (a setting greedy output depends on)
    assert "generation.max_new_tokens: 8 -> 6" in capsys.readouterr().err
    assert main(["run", str(job), "--no-progress", "--restart", "generation.do_sample=true", "generation.seed=9"]) == 0
    capsys.readouterr()
    assert main(["run", str(job), "--no-progress", "generation.do_sample=true", "generation.seed=10"]) == 2
    assert "generation.seed: 9 -> 10" in capsys.readouterr().err


def test_a_finished_job_is_left_alone_until_restart(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    job = make_job(tmp_path, src, **OPTS)
    out = tmp_path / "out" / "result.parquet"
    assert main(["run", str(job), "--no-progress"]) == 0
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    capsys.readouterr()
    for command in (["run", str(job), "--no-progress"], ["run", str(job), "--shard", "1/2"], ["merge", str(job)]):
        assert main(command) == 0
        captured = capsys.readouterr()
        assert summary(captured.out)["state"] == "done" and "is done" in captured.err
        assert "generating" not in captured.err and "weights:" not in captured.err  # the model was not loaded
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.parquet", "result.summary.json"]  # no checkpoint made
    assert main(["status", str(job)]) == 0 and summary(capsys.readouterr().out)["state"] == "done"
    assert main(["validate", str(job)]) == 0 and summary(capsys.readouterr().out)["state"] == "done"  # (a run would do nothing)
    assert main(["run", str(job), "--no-progress", "--restart"]) == 0  # regenerates on purpose
    assert summary(capsys.readouterr().out)["generated_rows"] == "4"
    assert out.stat().st_mtime_ns != before[1] and pq.read_table(out).equals(pq.read_table(pa.BufferReader(before[0])))


def test_the_nightly_entrys_overrides_generate_only_each_nights_new_rows(tmp_path, capsys, monkeypatch):
    """slurm/nightly.scrontab's KOMT_ARGS (as submit.sh and the array hand them to komt-batch), two
    nights, the input grown by two rows: the second night generates those two only."""
    line = next(x for x in (ROOT / "slurm" / "nightly.scrontab").read_text().splitlines() if x.startswith("0 2 "))
    overrides = shlex.split(line.split("KOMT_ARGS=", 1)[1])[0].split()
    assert [o.partition("=")[0] for o in overrides] == ["output.path", "input.reuse"]
    monkeypatch.chdir(tmp_path)  # (the entry's paths are relative: SLURM starts the jobs in the repository)
    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    job = make_job(tmp_path, src, **OPTS)
    done, said = {}, {}
    for night, n in (("2026-12-01", 4), ("2026-12-02", 6)):
        write_jsonl(src, rows(n))
        assert main(["run", str(job), "--no-progress", "--date", night, *overrides]) == 0
        captured = capsys.readouterr()
        done[night], said[night] = summary(captured.out), "input.reuse: no earlier output matches out/*/annotated.parquet" in captured.err
        assert pq.read_table(tmp_path / "out" / night / "annotated.parquet").column("id").to_pylist() == [r["id"] for r in rows(n)]
    assert (done["2026-12-01"]["generated_rows"], done["2026-12-02"]["generated_rows"], done["2026-12-02"]["reused_rows"]) == ("4", "2", "4")
    assert said == {"2026-12-01": True, "2026-12-02": False}  # (the first night's notice: nothing to reuse yet)
    first, second = (pq.read_table(tmp_path / "out" / night / "annotated.parquet") for night in ("2026-12-01", "2026-12-02"))
    assert second.slice(0, 4).column("response").equals(first.column("response"))


def test_a_finished_job_with_other_input_or_settings_is_refused_until_restart(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows(3))
    job = make_job(tmp_path, src, **OPTS)
    out = tmp_path / "out" / "result.parquet"
    assert main(["run", str(job), "--no-progress"]) == 0
    written = out.read_bytes()
    capsys.readouterr()
    for command in ("run", "validate"):  # validate finds what run would refuse
        assert main([command, str(job), "generation.max_new_tokens=6"]) == 2
        line = one_line(capsys)
        assert "output.path" in line and "generation.max_new_tokens: 8 -> 6" in line and "--restart" in line
    write_jsonl(src, rows(4))
    for command in ("run", "validate"):
        assert main([command, str(job)]) == 2
        line = one_line(capsys)
        assert "input rows: 3 -> 4" in line and f"(with input.reuse={out}, only rows that changed or are new are generated)" in line
    # ... as the line says: the grown input into another file, the 3 rows answered reused
    other = tmp_path / "out" / "grown.parquet"
    assert main(["run", str(job), "--no-progress", f"input.reuse={out}", f"output.path={other}"]) == 0
    assert (summary(capsys.readouterr().out)["reused_rows"], pq.read_table(other).num_rows) == ("3", 4)
    assert main(["status", str(job)]) == 0
    assert "input rows: 3 -> 4" in capsys.readouterr().out
    assert out.read_bytes() == written and not out.with_name("result.parquet.parts").exists()
    assert main(["run", str(job), "--no-progress", "--restart"]) == 0
    assert pq.read_table(out).num_rows == 4
    capsys.readouterr()
    # a file komt-batch did not write is never replaced, not even with --restart
    out.write_bytes(b"someone else's file")
    for args in (["run"], ["run", "--restart"], ["validate"]):
        assert main([*args, str(job)]) == 2
        assert "exists and komt-batch did not write it" in one_line(capsys)
    assert out.read_bytes() == b"someone else's file"


def test_an_edit_to_a_column_the_prompts_do_not_use_is_an_input_change(tmp_path, capsys):
    """The output carries every input column: a label edited in place (same ids, prompts and file size)
    must not leave the finished output "done" with the old label."""
    data = [{**r, "label": "cat"} for r in rows(3)]
    src = write_jsonl(tmp_path / "in.jsonl", data)
    job = make_job(tmp_path, src, **OPTS)
    out = tmp_path / "out" / "result.parquet"
    assert main(["run", str(job), "--no-progress"]) == 0
    size = src.stat().st_size
    write_jsonl(src, [{**r, "label": "cow"} if r["id"] == data[1]["id"] else r for r in data])
    assert src.stat().st_size == size
    capsys.readouterr()
    for command in ("run", "validate"):
        assert main([command, str(job)]) == 2
        assert "input content: in.jsonl changed (other columns than the ids and prompts)" in one_line(capsys)
    assert pq.read_table(out).column("label").to_pylist() == ["cat"] * 3  # left as it was until --restart
    assert main(["run", str(job), "--no-progress", "--restart"]) == 0
    assert pq.read_table(out).column("label").to_pylist() == ["cat", "cow", "cat"]


@pytest.mark.parametrize("keep", [False, True])
def test_a_job_finished_by_another_process_meanwhile_is_left_alone(tmp_path, capsys, monkeypatch, keep):
    """The output is checked again under the job lock: a run that finished while this one started
    (its first look said 'not there yet') is not redone, and its kept checkpoint stays."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    job = make_job(tmp_path, src, **{**OPTS, "checkpoint": {"every_rows": 2, "keep": keep}})
    out = tmp_path / "out" / "result.parquet"
    assert main(["run", str(job), "--no-progress"]) == 0
    written, kept = out.read_bytes(), sorted(p.name for p in out.parent.rglob("*"))
    looks = []
    real = runner.output_state

    def first_look_finds_nothing(*args):
        looks.append(1)
        return ("absent", []) if len(looks) == 1 else real(*args)

    monkeypatch.setattr(runner, "output_state", first_look_finds_nothing)
    capsys.readouterr()
    assert main(["run", str(job), "--no-progress"]) == 0
    assert len(looks) == 2 and summary(capsys.readouterr().out)["state"] == "done"
    assert out.read_bytes() == written and sorted(p.name for p in out.parent.rglob("*")) == kept


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (["--date", "2026-13-01"], "--date: expected a date as YYYY-MM-DD"),
        (["--date", "20261127"], "--date: expected a date as YYYY-MM-DD"),
        (["--time", "250000"], "--time: expected a time as HHMMSS"),
        (["--time", "12:00"], "--time: expected a time as HHMMSS"),
        (["--run-id", "a/b"], "--run-id: expected letters, digits"),
        (["--shards", "0"], "--shards: expected a number of shards >= 1"),
        (["--shards", "x"], "--shards: expected a number of shards >= 1"),
    ],
)
def test_date_time_shards_and_run_id_are_checked(tmp_path, capsys, bad, fragment):
    src = write_jsonl(tmp_path / "in.jsonl", rows(2))
    job = make_job(tmp_path, src, output={"path": str(tmp_path / "out" / "{date}-{time}-{job_id}.parquet")})
    command = "merge" if bad[0] == "--shards" else "run"
    assert main([command, str(job), *bad]) == 2
    line = one_line(capsys)
    assert fragment in line and repr(bad[1]) in line
    assert not (tmp_path / "out").exists()


RESUME_CASES = {
    # where the placeholders come from, the signal, the extra arguments, the environment
    "job file {date} {time}": ({"output": {"path": "{out}/{date}/{time}.parquet"}}, signal.SIGHUP, ["--date", "2026-11-27"], {}),
    "override {time}, with --restart": ({}, signal.SIGTERM, ["--restart", "output.path={out}/{time}/r.parquet"], {}),
    "SLURM {job_id} and shard": (
        {"output": {"path": "{out}/{job_id}/r.parquet"}},
        signal.SIGUSR1,
        [],
        {"SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"},
    ),
}


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_the_resume_hint_is_a_command_that_resumes(tmp_path, name):
    sections, sig, args, env = RESUME_CASES[name]
    src = write_jsonl(tmp_path / "in.jsonl", rows(16))
    out = tmp_path / "out"
    sections = json.loads(json.dumps(sections).replace("{out}", str(out)))
    job = make_job(tmp_path, src, generation={"max_new_tokens": 16}, batching={"max_batch_size": 2}, checkpoint={"every_rows": 2}, **sections)
    args = [a.replace("{out}", str(out)) for a in args]
    proc = start(job, *args, env=cli_env(**env), stdout=subprocess.DEVNULL)
    while not list(out.rglob("part-*.parquet")):  # some rows committed: the resume has work to skip
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(sig)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 75, err
    hint = err.split("To resume, run: ")[1].strip()
    assert "--restart" not in hint
    words = shlex.split(hint)
    assert words[:2] == ["komt-batch", "run"]
    plain = {k: v for k, v in cli_env().items() if not k.startswith("SLURM_")}  # later, outside SLURM, another {time}
    p = komt(*words[1:], env=plain)
    assert p.returncode == 0, p.stderr
    assert int(summary(p.stdout)["resumed_rows"]) > 0
    if "shard" in name:
        assert "--shard 1/2" in hint and "--run-id 4242" in hint
        assert (out / "4242" / "r.parquet.parts" / "summary-shard-1-of-2.json").exists()
    else:
        (final,) = out.rglob("*.parquet")
        assert pq.read_table(final).num_rows == 16


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_files_get_the_users_umask(tmp_path, capsys, umask):
    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    job = make_job(tmp_path, src, **{**OPTS, "checkpoint": {"every_rows": 2, "keep": True}})
    old = os.umask(umask)
    try:
        assert main(["run", str(job), "--no-progress"]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    files = [out / "result.parquet", out / "result.summary.json", *(out / "result.parquet.parts").iterdir()]
    assert len(files) > 6
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
