"""Every interrupted end finishes, and `status` never misleads: a run stopped after its final file
(a kill, a full disk at the summary) is finished by the next run or merge; `status` read while a
run finishes says what is true; a setting that changes the output file makes a finished output
"changed"; a part edited by hand does not verify. Real processes where a kill is the point."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import writer
from batch.cli import main
from batch.errors import WriteError
from tests.conftest import ROOT, cli_env, input_rows, komt, komt_argv, make_job, one_line, summary, write_jsonl

OPTS = dict(generation={"max_new_tokens": 4}, batching={"max_batch_size": 2}, checkpoint={"every_rows": 2})
TIMINGS = ("generate_seconds", "tokens_per_second", "wall_seconds")  # (differ from run to run)


def rows(n: int) -> list[dict]:
    return input_rows(n, "e", " 꼭", 3)


def run(*args) -> int:
    return main(["run", *map(str, args), "--no-progress"])


def without_timings(s: dict) -> dict:
    return {k: v for k, v in s.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 6 rows: (input, output table, its summary)."""
    root = tmp_path_factory.mktemp("reference")
    src = write_jsonl(root / "in.jsonl", rows(6))
    job = make_job(root, src, output={"path": str(root / "out" / "r.parquet")}, **OPTS)
    assert run(job) == 0
    return src, pq.read_table(root / "out" / "r.parquet"), json.loads((root / "out" / "r.summary.json").read_text())


@pytest.fixture
def job(tmp_path, reference):
    shutil.copy(reference[0], tmp_path / "in.jsonl")
    return make_job(tmp_path, tmp_path / "in.jsonl", output={"path": str(tmp_path / "out" / "r.parquet")}, **OPTS)


# --- a run stopped after its final file ---------------------------------------------------------------

STOPPED_AT = """
import os, signal, sys
from pathlib import Path
from batch import checkpoint, writer
where = os.environ["STOP_AT"]
write_summary, remove = writer.write_summary, checkpoint.Checkpoint.remove

def killed(what):
    print("KILLED", what, file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

def stop_at_summary(path, *args):
    if where == "the summary" and not path.name.startswith("summary"):  # the one beside the output
        killed(path)
    return write_summary(path, *args)

def stop_in_removal(self):
    if where == "the removal":
        self.owned_files()[0].unlink()  # one file of the checkpoint deleted, then the kill
        killed(self.dir)
    return remove(self)

writer.write_summary, checkpoint.Checkpoint.remove = stop_at_summary, stop_in_removal
from batch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def killed_before_the_summary(job, tmp_path, monkeypatch):
    return komt("run", job, "--no-progress", script=stopped_at(tmp_path), env=cli_env(STOP_AT="the summary")).returncode == -9


def killed_in_the_removal(job, tmp_path, monkeypatch):
    return komt("run", job, "--no-progress", script=stopped_at(tmp_path), env=cli_env(STOP_AT="the removal")).returncode == -9


def full_disk_at_the_summary(job, tmp_path, monkeypatch):
    real = writer.write_summary

    def full(path, *args):
        if not path.name.startswith("summary"):
            raise WriteError(f"{path}: cannot write: No space left on device")
        return real(path, *args)

    monkeypatch.setattr(writer, "write_summary", full)
    code = run(job)
    monkeypatch.undo()
    return code == 74


def stopped_at(tmp_path: Path) -> Path:
    script = tmp_path / "stopped_at.py"
    script.write_text(STOPPED_AT)
    return script


@pytest.mark.parametrize("finisher", ["run", "merge"])
@pytest.mark.parametrize("stop", [killed_before_the_summary, killed_in_the_removal, full_disk_at_the_summary])
def test_a_run_stopped_after_its_final_file_is_finished_by_the_next(tmp_path, capsys, monkeypatch, reference, job, stop, finisher):
    out, ckpt = tmp_path / "out" / "r.parquet", tmp_path / "out" / "r.parquet.parts"
    assert stop(job, tmp_path, monkeypatch)
    written = out.read_bytes()
    assert pq.read_table(out).equals(reference[1]) and ckpt.exists()
    capsys.readouterr()
    assert main(["status", str(job)]) == 0  # status says what is true, and changes nothing
    said = summary(capsys.readouterr().out)
    assert said["state"] == "done" and "the next run or merge finishes it" in said["not_finished"], said
    assert ckpt.exists()
    assert main([finisher, str(job), *(["--no-progress"] if finisher == "run" else [])]) == 0
    captured = capsys.readouterr()
    assert summary(captured.out)["state"] == "done" and "finished what the run that wrote" in captured.err
    assert out.read_bytes() == written  # the output is not written again
    if stop is not killed_in_the_removal:  # (there the summary was written before the kill)
        assert without_timings(json.loads((tmp_path / "out" / "r.summary.json").read_text())) == {
            **without_timings(reference[2]), "job": str(job), "output": str(out)}
    assert not ckpt.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.parquet", "r.summary.json"]
    assert main(["status", str(job)]) == 0
    assert "not_finished" not in capsys.readouterr().out


# --- status read while a run finishes --------------------------------------------------------------------

PAUSED_STATUS = """
import os, sys, time
from pathlib import Path
from batch import checkpoint, status
where, go = os.environ["PAUSE_AT"], Path(os.environ["GO"])
load_plan, done_rows = checkpoint.Checkpoint.load_plan, checkpoint.Checkpoint.done_rows

def pause():
    print("PAUSED", file=sys.stderr, flush=True)
    while not go.exists():
        time.sleep(0.01)

def paused_load(self, *args, **kwargs):
    plan = load_plan(self, *args, **kwargs)
    if where == "after reading the plan" and plan is not None and not go.exists():
        pause()
    return plan

def paused_done(self, *args, **kwargs):
    done = done_rows(self, *args, **kwargs)
    if where == "after verifying the parts" and not go.exists():
        pause()
    return done

checkpoint.Checkpoint.load_plan, checkpoint.Checkpoint.done_rows = paused_load, paused_done
from batch.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["after reading the plan", "after verifying the parts"])
def test_status_read_while_a_run_finishes_never_misleads(tmp_path, capsys, reference, job, where):
    """status reads a checkpoint of every row done (the final file not written yet) and is paused
    there while a run writes the final file and removes the checkpoint; then it goes on."""
    out = tmp_path / "out" / "r.parquet"
    assert run(job, "checkpoint.keep=true") == 0
    out.unlink()
    (out.parent / "r.summary.json").unlink()
    script = tmp_path / "paused.py"
    script.write_text(PAUSED_STATUS)
    go = tmp_path / "go"
    proc = subprocess.Popen(komt_argv("status", job, script=script), cwd=ROOT, env=cli_env(PAUSE_AT=where, GO=str(go)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline().strip() == "PAUSED"
    assert run(job) == 0  # writes the final file from the parts and removes the checkpoint
    assert not (out.parent / "r.parquet.parts").exists()
    go.touch()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "--restart" not in stderr + stdout and "damaged" not in stderr
    assert summary(stdout)["state"] == "done" and "not_finished" not in stdout


def test_status_before_the_final_file_does_not_say_done(tmp_path, capsys, job):
    out = tmp_path / "out" / "r.parquet"
    assert run(job, "checkpoint.keep=true") == 0
    out.unlink()
    capsys.readouterr()
    assert main(["status", str(job)]) == 0
    said = summary(capsys.readouterr().out)
    assert said["rows_done"] == "6" and said["state"].startswith("rows done; the final file is not written yet"), said


# --- what changes the output file is part of "the same" ------------------------------------------------


@pytest.mark.parametrize("override, change", [("output.response_column=answer", "output.response_column: 'response' -> 'answer'")])
def test_a_setting_that_changes_the_output_file_makes_it_changed(tmp_path, capsys, reference, job, override, change):
    out = tmp_path / "out" / "r.parquet"
    assert run(job) == 0
    written = out.read_bytes()
    capsys.readouterr()
    assert run(job, override) == 2
    line = one_line(capsys)
    assert change in line and "--restart" in line
    assert main(["validate", str(job), override]) == 2
    assert change in one_line(capsys)
    assert main(["status", str(job), override]) == 0
    assert change in capsys.readouterr().out
    assert out.read_bytes() == written  # refused: the old file is left as it was
    assert run(job, override, "--restart") == 0  # regenerated on purpose, with the new column
    table = pq.read_table(out)
    assert "answer" in table.column_names and "response" not in table.column_names
    assert table.column("answer").equals(reference[1].column("response"))
    capsys.readouterr()
    assert run(job, override) == 0 and summary(capsys.readouterr().out)["state"] == "done"


# --- a part edited by hand does not verify --------------------------------------------------------------


def edited(column, value):
    def edit(table):
        i = table.schema.get_field_index(column)
        values = table.column(column).to_pylist()
        values[0] = value(values[0])
        return table.set_column(i, column, pa.array(values, table.schema.field(column).type))

    return edit


EDITS = {
    "response text": edited("response", lambda v: (v or "") + " (edited)"),
    "finish reason": edited("finish_reason", lambda v: "eos" if v != "eos" else "stop"),
    "completion tokens": edited("completion_tokens", lambda v: v + 1),
    "an error added": edited("error", lambda v: "bad_input: edited"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_a_part_edited_by_hand_is_set_aside_and_its_rows_redone(tmp_path, capsys, reference, job, edit):
    """The part keeps its schema, its metadata (plan_id, the record of its content) and its rows'
    fingerprints: only a value differs. It is set aside, its rows are redone, the output is exact."""
    out = tmp_path / "out" / "r.parquet"
    assert run(job, "checkpoint.keep=true") == 0
    out.unlink()
    victim = sorted((tmp_path / "out" / "r.parquet.parts").glob("part-*.parquet"))[1]
    table = pq.read_table(victim)
    changed = EDITS[edit](table)
    assert not changed.equals(table) and changed.schema.equals(table.schema, check_metadata=True)
    pq.write_table(changed, victim)
    capsys.readouterr()
    assert run(job) == 0
    captured = capsys.readouterr()
    assert f"set aside {victim.name} (its rows were edited" in captured.err
    assert summary(captured.out)["generated_rows"] == "2"  # exactly the rows of the edited part
    assert pq.read_table(out).equals(reference[1])
