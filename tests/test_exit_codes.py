"""Exit codes from the process's first instant to its last, a full disk, and the rows a kill at the
worst moment makes the next run redo. Real processes and real signals; a full disk in-process."""

import errno
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch import checkpoint, row_order, writer
from batch.cli import main
from tests.conftest import (
    cli_env,
    input_rows,
    komt,
    make_job,
    part_rows,
    seed_rows,
    spawn,
    start,
    write_jsonl,
)

HANDLED = {signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP}


def rows(n: int) -> list[dict]:
    return input_rows(n, "x", " 또", 4)


def caught(pid: int) -> set[int]:
    """The signals a process has handlers for (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {s for s in signal.Signals if mask >> (s - 1) & 1}
    return set()


def alive(pid: int) -> bool:
    """Running, not a zombie that has exited already."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_at_start_up_exits_75_and_writes_nothing(tmp_path, sig):
    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    job = make_job(tmp_path, src)
    proc = start(job)
    deadline = time.time() + 30
    while not HANDLED <= caught(proc.pid):  # the first thing komt-batch's code does
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.001)
    proc.send_signal(sig)  # while it parses its arguments, or imports torch
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert f"stopped by {sig.name} before any work; nothing was written" in err and "Traceback" not in err
    assert f"got {sig.name} during start-up: stopping before any work" in err and "finishing the rows in flight" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, sig", [("run", signal.SIGTERM), ("run", signal.SIGHUP), ("merge", signal.SIGUSR1)])
def test_a_signal_after_the_final_file_exits_0(tmp_path, capsys, command, sig):
    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    job = make_job(tmp_path, src, generation={"max_new_tokens": 8})
    if command == "merge":
        for shard in ("0/2", "1/2"):
            assert main(["run", str(job), "--shard", shard, "--no-progress"]) == 0
    out = tmp_path / "out" / "result.parquet"
    proc = spawn(command, job, stdout=subprocess.DEVNULL)
    while not out.exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.001)
    sent = 0
    while alive(proc.pid):  # from the final file's rename to the process's end: signal it again and again
        proc.send_signal(sig)
        sent += 1
        time.sleep(0.002)
    err = proc.stderr.read()
    assert proc.wait() == 0, err
    assert sent >= 1 and "Traceback" not in err
    assert pq.read_table(out).num_rows == 4


@pytest.fixture
def job8(tmp_path, capsys):
    """A job of 8 rows (parts of 2 rows) and the output of an uninterrupted run of it."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(8))
    opts = dict(generation={"max_new_tokens": 8}, batching={"max_batch_size": 2}, checkpoint={"every_rows": 2})
    reference = make_job(tmp_path, src, "ref.yaml", output={"path": str(tmp_path / "ref.parquet")}, **opts)
    assert main(["run", str(reference), "--no-progress"]) == 0
    capsys.readouterr()
    return make_job(tmp_path, src, **opts), pq.read_table(tmp_path / "ref.parquet")


@pytest.mark.parametrize("failing", ["a part", "the final file", "the final file's sort runs"])
def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch, job8, failing):
    job, reference = job8
    out = tmp_path / "out" / "result.parquet"
    real_write = checkpoint.pq.write_table
    calls = []

    def write_table(table, where, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # (plan, settled, 2 parts, then)
            where.write(b"PAR1 half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, **kwargs)

    class FullDisk(writer.pq.ParquetWriter):  # the final file: its first row group fills the disk
        def __init__(self, where, *args, **kwargs):
            super().__init__(where, *args, **kwargs)
            self.sink = where

        def write_table(self, table, *args, **kwargs):
            self.sink.write(b"PAR1 half a file")
            raise OSError(errno.ENOSPC, "No space left on device")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "a part":
        monkeypatch.setattr(checkpoint.pq, "write_table", write_table)
    elif failing == "the final file":
        monkeypatch.setattr(writer.pq, "ParquetWriter", FullDisk)
    else:  # every part's results make a sort run, and the disk is full when the first is written
        monkeypatch.setattr(row_order, "RUN_BYTES", 1)
        monkeypatch.setattr(row_order.RowOrder, "_write_run", no_space)
    assert main(["run", str(job), "--no-progress"]) == 74
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("komt-batch: error: ")]
    assert "Traceback" not in err and err.strip().endswith(line)
    assert "No space left on device" in line and "Rows committed before it are kept" in line
    assert f"To resume, run: komt-batch run --no-progress {job}" in line
    assert not list(out.parent.rglob(".*.tmp")) and not out.exists()
    committed = part_rows(out)
    assert committed == (4 if failing == "a part" else 8)
    monkeypatch.undo()
    assert main(["run", str(job), "--no-progress"]) == 0
    assert f"resumed_rows              {committed}" in capsys.readouterr().out
    assert pq.read_table(out).equals(reference)


KILLER = """
import os, signal, sys
from batch import checkpoint, engine
counts = {"taken": 0, "finished": 0, "committed": 0}
take, finish, write_part = engine.Requests.take, engine.Engine.finish, checkpoint.Checkpoint.write_part

def counted_take(self):
    r = take(self)
    counts["taken"] += r is not None
    return r

def counted_finish(self, *args):
    counts["finished"] += 1
    return finish(self, *args)

def kill_at_a_commit(self, plan, shard, shards, table, stats):
    if counts["committed"] >= int(os.environ["KILL_AFTER_ROWS"]):  # the worst moment: a whole part about to land
        print("KILLED", *(f"{k}={v}" for k, v in counts.items()), f"pending={table.num_rows}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    counts["committed"] += table.num_rows
    return write_part(self, plan, shard, shards, table, stats)

engine.Requests.take, engine.Engine.finish, checkpoint.Checkpoint.write_part = counted_take, counted_finish, kill_at_a_commit
from batch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_at_the_worst_moment_redoes_one_commit_and_the_running_rows(tmp_path, capsys):
    """Rows of very different lengths (the ones that finish early used to wait for the slowest
    earlier batch): a kill just before a part lands loses that part's rows (checkpoint.every_rows)
    and the rows of the running batch (at most max_batch_size), nothing more."""
    every, size, n = 3, 4, 18
    seeds = seed_rows()
    data = [{"id": f"k{i:02d}", "instruction": seeds[i % 9]["instruction"] + ("" if i % 3 else " 그리고 더 길게 설명해 주세요" * 3)} for i in range(n)]
    src = write_jsonl(tmp_path / "in.jsonl", data)
    opts = dict(generation={"max_new_tokens": 16}, batching={"max_batch_size": size}, checkpoint={"every_rows": every, "every_seconds": 3600})
    ref = make_job(tmp_path, src, "ref.yaml", output={"path": str(tmp_path / "ref.parquet")}, **opts)
    assert main(["run", str(ref), "--no-progress"]) == 0
    job = make_job(tmp_path, src, **opts)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    p = komt("run", job, "--no-progress", script=script, env=cli_env(KILL_AFTER_ROWS=str(2 * every)), timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr
    counts = dict(w.split("=") for w in p.stderr.split("KILLED ")[1].split())
    taken, finished, committed, pending = (int(counts[k]) for k in ("taken", "finished", "committed", "pending"))
    on_disk = part_rows(tmp_path / "out" / "result.parquet")
    assert on_disk == committed == 2 * every
    in_batch = taken - committed - pending  # still generating, or finished in the same step, not yet handed over
    with capsys.disabled():  # the measured figures, for the README
        print(f"\nkill at the worst moment: {pending} rows of the part lost (every_rows={every}), {in_batch} rows of the running batch (max_batch_size={size}); {finished - committed} had finished")
    assert pending == every and 0 <= in_batch <= size
    capsys.readouterr()
    assert main(["run", str(job), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert f"resumed_rows              {committed}" in summary and f"generated_rows            {n - committed}" in summary
    assert pq.read_table(tmp_path / "out" / "result.parquet").equals(pq.read_table(tmp_path / "ref.parquet"))


def test_the_resume_command_of_a_full_disk_is_the_one_of_a_signal(tmp_path, capsys, monkeypatch, job8):
    """(a shard's command names its shard; the placeholders its paths use come along)"""
    job, _ = job8

    def write_table(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(checkpoint.pq, "write_table", write_table)
    assert main(["run", str(job), "--shard", "1/2", "--date", "2026-11-27", "output.path=" + str(tmp_path / "{date}.parquet")]) == 74
    err = capsys.readouterr().err
    assert "Disk quota exceeded" in err and "Traceback" not in err
    hint = shlex.split(err.split("To resume, run: ")[1])
    assert hint[:2] == ["komt-batch", "run"] and "--shard" in hint and "1/2" in hint and "2026-11-27" in hint
    assert os.path.basename(hint[-1]) == "{date}.parquet"


def test_a_signal_while_the_model_loads_stops_before_any_row(tmp_path, capsys, monkeypatch, job8):
    """A scheduler's SIGTERM while the weights load (minutes for the 7B model): the run stops as soon
    as they are loaded, before the first batch, and says so (not `generating ...`); the next run
    generates every row."""
    job, reference = job8
    from batch import runner

    load = runner.Engine.load

    def loading_when_signalled(*args, **kwargs):
        engine = load(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # (the handler runs in this thread, before the call returns)
        return engine

    monkeypatch.setattr(runner.Engine, "load", loading_when_signalled)
    assert main(["run", str(job), "--no-progress"]) == 75
    err = capsys.readouterr().err
    assert "got SIGTERM: the model is loading: the run stops once it is loaded, before any row\n" in err  # (no Ctrl-C: a scheduler's signal)
    assert "\n\nkomt-batch: got" not in err  # (no blank line before it in a log: that is for a terminal's progress bar)
    assert "stopped by SIGTERM while the model loaded, before any row was generated (0 rows done before)" in err
    assert "komt-batch: generating" not in err and "Traceback" not in err and "To resume, run: " in err
    monkeypatch.setattr(runner.Engine, "load", load)
    assert main(["run", str(job), "--no-progress"]) == 0
    assert "generated_rows            8" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "out" / "result.parquet").equals(reference)
