"""Crash safety with real processes: kill -9 loops, SIGTERM, damaged chunk files, changed inputs, locks."""

import os
import random
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import (
    input_rows,
    komt,
    make_job,
    parts,
    start,
    start_paused,
    summary,
    wait_generating,
    write_jsonl,
)


def many_rows(n: int) -> list[dict]:
    return input_rows(n, "r", " 추가", 5, digits=3)


def wait_for_parts(out, at_least: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if len(parts(out)) >= at_least:
            return
        time.sleep(0.02)


# stop_token_ids 412: "롤"; the answers' own words as stop words ("니다" ends most first sentences)
OPTIONS = {"stop_token_ids": [412], "min_new_tokens": 5, "repetition_penalty": 1.3, "include_stop_str_in_output": True, "stop": ["니다", "###"]}


@pytest.mark.parametrize("sampling, options", [(False, {}), (True, {}), (True, OPTIONS)], ids=["greedy", "sampled", "sampled+options"])
def test_kill_loop_gives_the_uninterrupted_file(tmp_path, sampling, options):
    src = write_jsonl(tmp_path / "in.jsonl", many_rows(48))
    gen = {"max_new_tokens": 24, "do_sample": sampling, "seed": 7, **options}
    ref_job = make_job(tmp_path, src, "ref.yaml", generation=gen, output={"path": str(tmp_path / "ref.parquet")}, batching={"max_batch_size": 2}, checkpoint={"every_rows": 2})
    job = make_job(tmp_path, src, "job.yaml", generation=gen, batching={"max_batch_size": 2}, checkpoint={"every_rows": 2})
    out = tmp_path / "out" / "result.parquet"
    p = komt("run", ref_job, "--no-progress")
    assert p.returncode == 0, p.stderr
    rng = random.Random(1234 + sampling)
    kills = 0
    while kills < 5:
        proc = start(job)
        wait_for_parts(out, len(parts(out)) + 1, proc)  # let it make progress, then kill at a random moment
        committed = time.time()
        wait_for_parts(out, len(parts(out)) + 1, proc)
        time.sleep(rng.uniform(0.0, time.time() - committed))  # within the next part, at this machine's pace
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills == 5, "the run finished before it could be killed 5 times; make the job longer"
    p = komt("run", job, "--no-progress")
    assert p.returncode == 0, p.stderr
    got, ref = pq.read_table(out), pq.read_table(tmp_path / "ref.parquet")
    ids = got.column("id").to_pylist()
    assert ids == [r["id"] for r in many_rows(48)]  # every id exactly once, input order
    assert got.equals(ref)
    assert not list(out.parent.glob(".*.tmp"))
    if options:  # the stop words ended rows, and stayed in their responses
        stopped = [(r, w) for r, w in zip(got.column("response").to_pylist(), got.column("stop_reason").to_pylist()) if w == "니다"]
        assert len(stopped) > 10 and all(r.endswith("니다") for r, _ in stopped)


def test_sigterm_commits_and_exits_75_then_resumes(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", many_rows(40))
    job = make_job(tmp_path, src, batching={"max_batch_size": 2}, checkpoint={"every_rows": 100, "every_seconds": 3600})
    out = tmp_path / "out" / "result.parquet"
    proc, _ = start_paused(job, 4, tmp_path)  # 4 rows finished, 36 to go: it waits, stopped, for the signal
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "To resume, run: komt-batch run" in err
    assert "got SIGTERM: no new batch starts; finishing the rows in flight, then checkpointing" in err
    committed = parts(out)
    assert committed, "rows finished before SIGTERM must be committed"  # every_rows is larger than the job
    done_rows = sum(pq.read_metadata(p).num_rows for p in committed)
    assert 4 <= done_rows <= 4 + 2  # the rows finished before SIGTERM, and those in flight (max_batch_size)
    p = komt("run", job, "--no-progress")
    assert p.returncode == 0, p.stderr
    assert f"resumed_rows              {done_rows}" in p.stdout
    assert pq.read_table(out).num_rows == 40


def test_damaged_chunk_files_are_redone(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", many_rows(8))
    job = make_job(tmp_path, src, checkpoint={"every_rows": 2, "keep": True}, batching={"max_batch_size": 2})
    out = tmp_path / "out" / "result.parquet"
    assert komt("run", job, "--no-progress").returncode == 0
    reference = pq.read_table(out)
    chunk_files = parts(out)
    assert len(chunk_files) == 4
    data = chunk_files[0].read_bytes()
    chunk_files[0].write_bytes(data[: len(data) // 2])  # torn write
    data = bytearray(chunk_files[2].read_bytes())
    data[len(data) // 3 : len(data) // 3 + 40] = os.urandom(40)  # garbage in the middle
    chunk_files[2].write_bytes(bytes(data))
    out.unlink()
    p = komt("run", job, "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "generated_rows            4" in p.stdout  # exactly the two damaged chunks' rows
    assert pq.read_table(out).equals(reference)


def test_changed_input_or_setting_is_refused_until_restart(tmp_path):
    rows = many_rows(6)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    job = make_job(tmp_path, src, checkpoint={"every_rows": 2, "keep": True}, batching={"max_batch_size": 2})
    out = tmp_path / "out" / "result.parquet"
    assert komt("run", job, "--no-progress", "generation.max_new_tokens=4").returncode == 0
    p = komt("run", job, "--no-progress", "generation.max_new_tokens=5")
    assert p.returncode == 2
    assert "generation.max_new_tokens: 4 -> 5" in p.stderr and "--restart" in p.stderr
    assert "Traceback" not in p.stderr
    checked = komt("validate", job, "generation.max_new_tokens=5")  # validate checks what run checks: the same line
    assert checked.returncode == 2 and checked.stderr == p.stderr
    checked = komt("validate", job, "generation.max_new_tokens=5", "--restart")  # (as run --restart would)
    assert checked.returncode == 0 and summary(checked.stdout)["state"] == "valid", checked.stderr
    write_jsonl(src, rows + [{"id": "new", "instruction": "새 질문"}])
    p = komt("run", job, "--no-progress", "generation.max_new_tokens=4")
    assert p.returncode == 2 and "input rows: 6 -> 7" in p.stderr
    before = out.read_bytes()
    assert out.read_bytes() == before  # the refusal damaged nothing
    p = komt("run", job, "--no-progress", "generation.max_new_tokens=4", "--restart")
    assert p.returncode == 0, p.stderr
    assert pq.read_table(out).num_rows == 7


def test_second_run_on_the_same_output_refuses(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", many_rows(16))
    job = make_job(tmp_path, src, batching={"max_batch_size": 2})
    first = start(job)
    wait_generating(first)  # it holds the job lock from now to its end
    first.send_signal(signal.SIGSTOP)  # paused: surely still running while the second one starts
    p = komt("run", job, "--no-progress")
    first.send_signal(signal.SIGCONT)
    first.communicate(timeout=120)
    assert p.returncode == 2
    assert "another komt-batch process is running" in p.stderr
    assert first.returncode == 0
    assert pq.read_table(tmp_path / "out" / "result.parquet").num_rows == 16


def test_status_reports_progress(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", many_rows(6))
    job = make_job(tmp_path, src, checkpoint={"every_rows": 2, "keep": True}, batching={"max_batch_size": 2})
    p = komt("status", job)
    assert p.returncode == 0 and "not started" in p.stdout
    assert komt("run", job, "--no-progress").returncode == 0
    p = komt("status", job)
    assert p.returncode == 0, p.stderr
    assert "rows_done          6" in p.stdout and "chunks_done        3" in p.stdout
    assert "plan_matches       True" in p.stdout
    p = komt("status", job, "generation.repetition_penalty=1.5")  # (greedy: top_k, top_p, temperature, seed would change nothing)
    assert "plan_matches       False" in p.stdout and "generation.repetition_penalty: 1.0 -> 1.5" in p.stdout
