"""The real CLI on a real SLURM cluster: slurm/submit.sh, preemption and requeue, a failing shard."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch.cli import main
from tests.conftest import ROOT, cli_env, seed_rows, write_jsonl
from tests.test_slurm_smoke import Submission, slurm  # noqa: F401  (slurm: the cluster, emptied after each test)

pytestmark = pytest.mark.slurm

JOB = """\
model:
  base: {repo}/models/tiny-komt/base
  adapter: {repo}/models/tiny-komt/adapter
  quantization: nf4
  compute_dtype: float32
  device_map: cpu
input:
  path: {src}
  id_column: id
generation:
  max_new_tokens: 40
  do_sample: true
  seed: 3
batching:
  max_batch_size: 2
  max_batch_tokens: 4096
output:
  path: out/{{date}}-{{job_id}}/result.parquet
checkpoint:
  every_rows: 2
"""


def prompts(n: int) -> list[dict]:
    seeds = seed_rows()
    return [{"id": f"s{i:02d}", "instruction": seeds[i % 9]["instruction"] + " 다시" * (i // 9)} for i in range(n)]


def real_cli() -> str:
    return f"{sys.executable} -m batch"


def submit(slurm, tmp_path: Path, n: int, komt_batch: str | None = None) -> Submission:
    src = write_jsonl(tmp_path / "prompts.jsonl", prompts(36))
    env = cli_env()
    return Submission(
        slurm, tmp_path, n,
        komt_batch=komt_batch or real_cli(),
        job_text=JOB.format(repo=ROOT, src=src),
        KOMT_DATE="2026-11-27", KOMT_TIME="020000",
        PYTHONPATH=env["PYTHONPATH"], HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
    )


def wait_for_log(sub: Submission, task: int, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in sub.task_log(task):
        assert time.monotonic() < deadline, sub.report()
        time.sleep(0.1)


def single_process_run(tmp_path: Path) -> Path:
    out = tmp_path / "single.parquet"
    code = main(["run", str(tmp_path / "job.yaml"), f"output.path={out}", "--no-progress"])
    assert code == 0
    return out


def test_three_shards_with_preemption_merge_to_the_single_run(slurm, tmp_path):
    sub = submit(slurm, tmp_path, 3)
    # shard 1: USR1 as SLURM sends it before the time limit -> checkpoint, exit 75, the task requeues itself
    wait_for_log(sub, 1, "komt-batch: generating")
    slurm.scancel("--signal=USR1", "--batch", f"{sub.array_id}_1")
    # shard 2: preempted by an admin's `scontrol requeue` (SIGTERM to the job; SLURM requeues it)
    wait_for_log(sub, 2, "komt-batch: generating")
    slurm.run(["scontrol", "requeue", f"{sub.array_id}_2"])
    assert slurm.wait(sub.merge_id, timeout=400) == "COMPLETED", sub.report()
    assert sub.task(1)["Restarts"] == "1" and sub.task(2)["Restarts"] == "1", sub.report()
    log1 = sub.task_log(1)
    assert "got SIGUSR1" in log1 and "exited with code 75" in log1 and "resuming after requeue #1" in log1
    assert "rows already done" in log1.split("resuming after requeue #1")[1]

    out = tmp_path / "out" / f"2026-11-27-{sub.array_id}" / "result.parquet"
    merged = pq.read_table(out)
    assert merged.column("id").to_pylist() == [p["id"] for p in prompts(36)]  # every row exactly once
    assert merged.equals(pq.read_table(single_process_run(tmp_path)))  # sampled, seeded per row
    summary = json.loads(out.with_name("result.summary.json").read_text())
    assert summary["rows"] == 36 and summary["finish_reasons"]


FAILING_WRAPPER = """#!/bin/bash
# the real CLI, except that array task 1 fails as a crashed node would
if [[ $1 == run && ${{SLURM_ARRAY_TASK_ID:-}} == 1 ]]; then echo "simulated failure" >&2; exit 1; fi
exec {python} -m batch "$@"
"""


def test_a_failed_shard_blocks_the_merge_and_merge_names_it(slurm, tmp_path):
    wrapper = tmp_path / "komt-wrapper"
    wrapper.write_text(FAILING_WRAPPER.format(python=sys.executable))
    wrapper.chmod(0o755)
    sub = submit(slurm, tmp_path, 3, komt_batch=str(wrapper))
    deadline = time.monotonic() + 300
    while True:
        states = slurm.states(sub.array_id)
        if all(s in ("COMPLETED", "FAILED") for s in states.values()) and len(states) == 3:
            break
        assert time.monotonic() < deadline, sub.report()
        time.sleep(0.5)
    assert states[f"{sub.array_id}_1"] == "FAILED" and sub.task(1)["Restarts"] == "0"
    # afterok can never be satisfied: SLURM cancels the merge (--kill-on-invalid-dep) without running it
    slurm.wait_until(sub.merge_id, lambda jobs: jobs[0]["JobState"] == "CANCELLED", timeout=30)
    assert not sub.merge_log()
    p = subprocess.run(
        [sys.executable, "-m", "batch", "merge", "job.yaml", "--shards", "3", "--date", "2026-11-27", "--run-id", sub.array_id],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
    )
    assert p.returncode == 1
    assert "missing shards (of 3): 1/3" in p.stderr
    out = tmp_path / "out" / f"2026-11-27-{sub.array_id}" / "result.parquet"
    assert not out.exists()
    # the README's recipe: the shard rerun alone (KOMT_SHARDS: task 1 is shard 1/3, not 0/1), then merge
    rerun = slurm.sbatch(
        ["--export=ALL", "--array=1", "--time=10", "--cpus-per-task=1", "--mem=100M", str(ROOT / "slurm" / "komt-array.sbatch")],
        cwd=tmp_path,
        env={**sub.env, "KOMT_BATCH": real_cli(), "KOMT_JOB": str(tmp_path / "job.yaml"), "KOMT_DATE": "2026-11-27",
             "KOMT_TIME": "020000", "KOMT_RUN_ID": sub.array_id, "KOMT_SHARDS": "3"},
    )
    assert slurm.wait(f"{rerun}_1", timeout=300) == "COMPLETED", slurm.debug_report(rerun)
    log = (tmp_path / "logs" / f"komt-batch-{rerun}_1.out").read_text()
    assert "shard=1/3" in log and "(shard 1/3;" in log, log
    assert not out.exists()  # a shard writes its chunks only: the merge writes the file
    p = subprocess.run(
        [sys.executable, "-m", "batch", "merge", "job.yaml", "--shards", "3", "--date", "2026-11-27", "--run-id", sub.array_id],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
    )
    assert p.returncode == 0, p.stderr
    assert pq.read_table(out).column("id").to_pylist() == [r["id"] for r in prompts(36)]


def test_two_processes_per_array_task_are_two_shards(slurm, tmp_path):
    """One array task with PROCS_PER_TASK=2 (as one process per GPU on a 2-GPU node) -> 2 shards."""
    src = write_jsonl(tmp_path / "prompts.jsonl", prompts(12))
    env = cli_env()
    sub = Submission(
        slurm, tmp_path, 1, komt_batch=real_cli(), job_text=JOB.format(repo=ROOT, src=src),
        KOMT_DATE="2026-11-27", KOMT_TIME="020000", PROCS_PER_TASK="2",
        PYTHONPATH=env["PYTHONPATH"], HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
    )
    assert slurm.wait(sub.merge_id, timeout=300) == "COMPLETED", sub.report()
    log = sub.task_log(0)
    assert "(shard 0/2;" in log and "(shard 1/2;" in log
    out = tmp_path / "out" / f"2026-11-27-{sub.array_id}" / "result.parquet"
    assert pq.read_table(out).column("id").to_pylist() == [p["id"] for p in prompts(12)]
