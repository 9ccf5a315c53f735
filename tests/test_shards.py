"""Shards of one plan, merge, per-shard status, SLURM's environment, and reuse of earlier outputs."""

import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from batch.checkpoint import Checkpoint
from batch.cli import main
from batch.plan import assign_shards
from batch.shards import parse_shard, slurm_shard
from batch.errors import JobError
from tests.conftest import ROOT, cli_env, make_job, seed_rows, write_jsonl
from tests.conftest import summary as summary_of


def rows(n, start=0):
    seeds = seed_rows()
    return [{"id": f"q{i:02d}", "instruction": seeds[i % 9]["instruction"] + " 왜" * (i % 4)} for i in range(start, n)]


OPTS = dict(generation={"max_new_tokens": 12}, batching={"max_batch_size": 2}, checkpoint={"every_rows": 2})


def test_three_shards_then_merge_equal_one_run(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows(11))
    single = make_job(tmp_path, src, "single.yaml", output={"path": str(tmp_path / "single.parquet")}, **OPTS)
    sharded = make_job(tmp_path, src, "sharded.yaml", **OPTS)
    assert main(["run", str(single), "--no-progress"]) == 0
    assert main(["run", str(sharded), "--shard", "0/3", "--no-progress"]) == 0
    assert main(["run", str(sharded), "--shard", "2/3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["status", str(sharded)]) == 0
    status = capsys.readouterr().out
    assert "shards_of_3" in status and '"1/3": "0/' in status
    said = summary_of(status)
    assert said["state"] == "partly done"  # (status cannot see whether a run goes on: it says when one last committed)
    assert re.fullmatch(r"20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d\d:\d\d ago\)", said["last_commit"]), said["last_commit"]
    ckpt = Checkpoint(tmp_path / "out" / "result.parquet.parts")
    plan = ckpt.load_plan()
    owner = assign_shards(plan.chunks, 3)
    shard_1 = sum(c.rows for c in plan.chunks if owner[c.index] == 1)
    parts = [ckpt.part_stats(p) for p in ckpt.dir.glob("part-*.parquet")]
    per_row = sum(p["seconds"] for p in parts) / sum(p["rows"] for p in parts)
    assert int(said["rows_done"]) == 11 - shard_1 and said["eta_assumes"] == "the 3 shards run side by side"
    assert int(said["eta_seconds"]) == round(shard_1 * per_row)  # shard 1's rows: the other two are done
    assert main(["merge", str(sharded)]) == 1
    err = capsys.readouterr().err
    assert "cannot merge yet" in err and "missing shards (of 3): 1/3" in err
    out = tmp_path / "out" / "result.parquet"
    assert not out.exists()
    assert main(["run", str(sharded), "--shard", "1/3", "--no-progress"]) == 0
    assert not out.exists()  # shards never write the final file; merge does
    assert main(["merge", str(sharded)]) == 0
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "single.parquet"))
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert summary["rows"] == 11 and summary["generated_rows"] == 11
    # the shards' own figures, summed (each shard ran once here: they add up to the output's columns)
    merged = pq.read_table(out)
    assert summary["completion_tokens"] == sum(merged.column("completion_tokens").to_pylist())
    assert summary["prompt_tokens"] == sum(merged.column("prompt_tokens").to_pylist())
    assert summary["shard_summaries"] == 3 and summary["oom_splits"] == 0 and summary["lowered_max_batch_tokens"] is None
    assert summary["tokens_per_second"] == round(summary["completion_tokens"] / summary["generate_seconds"], 1)
    single = json.loads((tmp_path / "single.summary.json").read_text())
    assert {k for k in single if k not in ("planned_rows", "resumed_rows", "wall_seconds")} <= set(summary)


def test_merge_says_when_the_input_changed_before_naming_missing_shards(tmp_path, capsys):
    """Rerunning the missing shards would be refused (the input changed): merge says that, not 'rerun them'."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(6))
    job = make_job(tmp_path, src, **OPTS)
    assert main(["run", str(job), "--shard", "0/3", "--no-progress"]) == 0
    write_jsonl(src, rows(7))
    capsys.readouterr()
    assert main(["merge", str(job), "--shards", "3"]) == 2
    err = capsys.readouterr().err
    assert "the input or settings changed since the plan was made: " in err and "input rows: 6 -> 7. Run with --restart to start over." in err
    assert "cannot merge yet" not in err


def test_shards_share_the_plan_and_get_balanced_tokens(tmp_path, capsys):
    from batch.checkpoint import Checkpoint
    from batch.plan import assign_shards

    src = write_jsonl(tmp_path / "in.jsonl", rows(20))
    job = make_job(tmp_path, src, **OPTS)
    assert main(["run", str(job), "--shard", "0/4", "--no-progress"]) == 0
    plan = Checkpoint(tmp_path / "out" / "result.parquet.parts").load_plan()
    owner = assign_shards(plan.chunks, 4)
    loads = [sum(c.tokens for c in plan.chunks if owner[c.index] == s) for s in range(4)]
    assert max(loads) - min(loads) <= max(c.tokens for c in plan.chunks)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (0, 1)),
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "8"}, (2, 4)),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, (3, 6)),
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}, (3, 4)),
    ],
)
def test_shard_from_slurm_environment(env, expected):
    assert slurm_shard(env) == expected


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, "SLURM_ARRAY_TASK_ID='x': expected a number"),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "-2"}, "SLURM_NTASKS='-2': expected a number"),
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4"}, "gives shard 5 of 4, which does not exist"),
    ],
)
def test_a_malformed_slurm_environment_is_one_clear_error(env, fragment):
    with pytest.raises(JobError) as e:
        slurm_shard(env)
    assert fragment in str(e.value) and "--shard I/N" in str(e.value)


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(JobError, match="--shard"):
            parse_shard(bad)


def test_reuse_generates_only_new_rows_and_equals_a_full_run(tmp_path, capsys):
    day1 = write_jsonl(tmp_path / "day1.jsonl", rows(6))
    day2 = write_jsonl(tmp_path / "day2.jsonl", rows(6) + rows(9, start=6))
    first = make_job(tmp_path, day1, "day1.yaml", output={"path": str(tmp_path / "old" / "day1.parquet")}, **OPTS)
    full = make_job(tmp_path, day2, "full.yaml", output={"path": str(tmp_path / "full.parquet")}, **OPTS)
    second = make_job(tmp_path, day2, "day2.yaml", input={"reuse": str(tmp_path / "old" / "*.parquet")}, **OPTS)
    assert main(["run", str(first), "--no-progress"]) == 0
    assert main(["run", str(full), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["run", str(second), "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert (summary["reused_rows"], summary["generated_rows"]) == (6, 3)
    assert "reused_rows               6" in out
    got = pq.read_table(tmp_path / "out" / "result.parquet")
    assert got.equals(pq.read_table(tmp_path / "full.parquet"))
    # a changed setting changes every fingerprint: nothing is reused
    assert main(["run", str(second), "--no-progress", "generation.max_new_tokens=6", "--restart"]) == 0
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert (summary["reused_rows"], summary["generated_rows"]) == (0, 9)


def test_reuse_of_an_output_made_before_the_stop_reason_column_redoes_its_stop_rows(tmp_path, capsys):
    """Its `stop` rows have no stop_reason to carry over: they are generated again; the others are reused."""
    gen = {"generation": {"max_new_tokens": 12, "stop": ["니다", "는"]}}
    opts = {**OPTS, **gen}
    day1 = write_jsonl(tmp_path / "day1.jsonl", rows(9))
    first = make_job(tmp_path, day1, "day1.yaml", output={"path": str(tmp_path / "old" / "day1.parquet")}, **opts)
    second = make_job(tmp_path, day1, "day2.yaml", input={"reuse": str(tmp_path / "old" / "*.parquet")}, **opts)
    assert main(["run", str(first), "--no-progress"]) == 0
    old = pq.read_table(tmp_path / "old" / "day1.parquet")
    stopped = old.column("finish_reason").to_pylist().count("stop")
    assert 0 < stopped < 9 and old.column("stop_reason").null_count == 9 - stopped
    pq.write_table(old.drop_columns(["stop_reason"]), tmp_path / "old" / "day1.parquet")  # as an earlier version wrote it
    capsys.readouterr()
    assert main(["run", str(second), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert (summary["reused_rows"], summary["generated_rows"]) == (9 - stopped, stopped)
    assert pq.read_table(tmp_path / "out" / "result.parquet").equals(old)


def test_shards_starting_at_once_plan_once(tmp_path, capsys):
    """Three shards start together with no plan stored: one renders, tokenizes and stores the
    plan, the others wait for it and use it."""
    src = write_jsonl(tmp_path / "in.jsonl", rows(12))
    job = make_job(tmp_path, src, **OPTS)
    procs = [
        subprocess.Popen([sys.executable, "-m", "batch", "run", str(job), "--shard", f"{i}/3", "--no-progress"],
                         cwd=ROOT, env=cli_env(), stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    assert sum("komt-batch: planning 12 rows" in e for e in errs) == 1, errs
    assert sum("komt-batch: using the plan stored" in e for e in errs) == 2, errs
    assert main(["merge", str(job)]) == 0
    merged = pq.read_table(tmp_path / "out" / "result.parquet")
    assert merged.column("id").to_pylist() == [r["id"] for r in rows(12)]
    assert merged.column("finish_reason").null_count == 0


def test_plan_command_plans_once_for_every_shard(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows(6))
    job = make_job(tmp_path, src, **OPTS)
    assert main(["plan", str(job)]) == 0
    first = capsys.readouterr()
    assert "state         planned" in first.out and "komt-batch: planned 6 rows" in first.err
    plan_id = next(line.split()[1] for line in first.out.splitlines() if line.startswith("plan_id"))
    assert main(["plan", str(job)]) == 0  # a stored plan that matches is kept
    again = capsys.readouterr()
    assert f"plan_id       {plan_id}" in again.out and "komt-batch: planned" not in again.err
    assert main(["run", str(job), "--shard", "1/2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "komt-batch: plann" not in err and "using the plan stored" in err


def test_a_plan_that_fails_writes_nothing(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows(6))
    job = make_job(tmp_path, src, batching={"max_batch_tokens": 20})
    assert main(["plan", str(job)]) == 2
    assert "batching.max_batch_tokens: 20 is too small" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reuse_of_a_file_whose_name_looks_like_a_glob(tmp_path, capsys):
    day1 = write_jsonl(tmp_path / "day1.jsonl", rows(4))
    old = tmp_path / "old[v2].parquet"  # as a glob, it would match old2.parquet, not itself
    first = make_job(tmp_path, day1, "day1.yaml", output={"path": str(old)}, **OPTS)
    assert main(["run", str(first), "--no-progress"]) == 0
    second = make_job(tmp_path, day1, "day2.yaml", input={"reuse": str(old)}, **OPTS)
    capsys.readouterr()
    assert main(["validate", str(second)]) == 0
    out = capsys.readouterr().out
    assert "reused_rows      4" in out and "planned_rows     0" in out


def test_merge_checks_the_output_path_before_anything(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    job = make_job(tmp_path, src, **OPTS)
    assert main(["run", str(job), "--shard", "0/1", "--no-progress", "checkpoint.keep=true"]) == 0
    (tmp_path / "out" / "result.parquet").unlink()
    (tmp_path / "out" / "result.summary.json").unlink()
    (tmp_path / "out" / "result.summary.json").mkdir()  # where merge would write the summary
    capsys.readouterr()
    assert main(["merge", str(job), "checkpoint.keep=true"]) == 2
    err = capsys.readouterr().err
    assert "output.path (its summary)" in err and "is an existing directory" in err
    assert not (tmp_path / "out" / "result.parquet").exists()  # nothing written


def test_status_of_a_plan_with_no_row_yet(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", rows(4))
    job = make_job(tmp_path, src, **OPTS)
    assert main(["plan", str(job)]) == 0
    capsys.readouterr()
    assert main(["status", str(job)]) == 0
    said = summary_of(capsys.readouterr().out)
    assert said["state"] == "planned; no row committed yet" and said["last_commit"] == "none yet" and said["rows_done"] == "0"
