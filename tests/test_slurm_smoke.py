"""Smoke tests against a real single-node SLURM cluster (tests/slurm_cluster.py).

Part 1 checks the SLURM behaviours the batch scripts rely on (array env vars,
afterok dependencies, requeue from inside a job). Part 2 runs slurm/submit.sh
and the .sbatch files with a stand-in for komt-batch.

Skipped when not root / SLURM cannot be installed; KOMT_REQUIRE_SLURM=1 makes
that a failure instead. Whole module: ~30 s (plus the apt-get install the first
time: 4-15 s). The real CLI on the tiny model runs in tests/test_slurm_jobs.py.
"""

from __future__ import annotations

import os
import stat
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # not imported at run time: pytest_plugins below loads it,
    # and importing it here first would stop pytest rewriting its asserts.
    from tests.slurm_cluster import SlurmCluster

# Loads the fixture. Harmless once a conftest.py lists the plugin too (a
# plugin module is registered only once). Add `pytestmark = pytest.mark.slurm`
# then: the marker is registered by the plugin, which a test module's own
# pytest_plugins loads too late for a module-level mark.
pytest_plugins = ["tests.slurm_cluster"]

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "slurm" / "submit.sh"


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster):
    """The session cluster, with the queue emptied after each test: the node
    has only as many CPUs as this machine (2 here), so leftovers would delay
    the next test's jobs."""
    t0 = time.monotonic()
    yield slurm_cluster
    slurm_cluster.cancel_all()
    print(f"[timing] test body + cleanup: {time.monotonic() - t0:.1f}s")


def _wait_for_file(path: Path, cluster: SlurmCluster, job_id: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear in {timeout}s\n{cluster.debug_report(job_id)}")
        time.sleep(0.1)


def _timed(cluster: SlurmCluster, label: str, t0: float) -> float:
    secs = time.monotonic() - t0
    cluster.timings[label] = secs  # shown in the terminal summary
    print(f"[timing] {label}: {secs:.1f}s")
    return secs


# --------------------------------------------------------------------------- #
# Part 1: plain SLURM behaviour
# --------------------------------------------------------------------------- #

def test_array_tasks_see_their_index_and_count(slurm: SlurmCluster, tmp_path: Path):
    t0 = time.monotonic()
    job = slurm.sbatch(
        ["--array=0-1", "--output=slurm-%A_%a.out", "--wrap",
         'echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT" > task-$SLURM_ARRAY_TASK_ID.txt; '
         'echo "hello from $SLURM_ARRAY_TASK_ID"'],
        cwd=tmp_path)
    assert slurm.wait(job, timeout=30) == "COMPLETED", slurm.debug_report(job)
    _timed(slurm, "array of 2 --wrap tasks", t0)

    assert (tmp_path / "task-0.txt").read_text().split() == ["0", "2"]
    assert (tmp_path / "task-1.txt").read_text().split() == ["1", "2"]
    # The log helper resolves %A/%a through scontrol.
    assert slurm.stdout_path(f"{job}_1") == tmp_path / f"slurm-{job}_1.out"
    assert "hello from 1" in slurm.read_stdout(f"{job}_1")


def test_afterok_dependency_on_failed_job_never_runs(slurm: SlurmCluster, tmp_path: Path):
    t0 = time.monotonic()
    # sleep 1: the dependants are submitted while it still runs, as in real use.
    failing = slurm.sbatch(["--output=fail.out", "--wrap", "sleep 1; exit 3"], cwd=tmp_path)
    plain = slurm.sbatch(["--output=dep.out", f"--dependency=afterok:{failing}",
                          "--wrap", "touch plain-ran"], cwd=tmp_path)
    killed = slurm.sbatch(["--output=dep2.out", f"--dependency=afterok:{failing}",
                           "--kill-on-invalid-dep=yes", "--wrap", "touch killed-ran"],
                          cwd=tmp_path)

    assert slurm.wait(failing, timeout=30) == "FAILED"
    assert slurm.job(failing)["ExitCode"] == "3:0"

    # Without --kill-on-invalid-dep the dependant stays PENDING forever...
    rec = slurm.wait_until(
        plain, lambda r: r[0]["Reason"] == "DependencyNeverSatisfied", timeout=15,
        what="Reason=DependencyNeverSatisfied")[0]
    assert rec["JobState"] == "PENDING"
    slurm.scancel(plain)
    assert slurm.wait(plain, timeout=15) == "CANCELLED"
    # ...with it, SLURM cancels it by itself.
    assert slurm.wait(killed, timeout=15) == "CANCELLED"
    assert slurm.job(killed)["Reason"] == "DependencyNeverSatisfied"
    _timed(slurm, "afterok after failure -> DependencyNeverSatisfied", t0)

    assert not (tmp_path / "plain-ran").exists()
    assert not (tmp_path / "killed-ran").exists()


REQUEUE_SCRIPT = """\
#!/bin/bash
#SBATCH --output=requeue.out
#SBATCH --open-mode=append
#SBATCH --requeue
echo "start restart=${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then
    # The requeue below also SIGTERMs this script: ignore that, then exit.
    trap 'echo got USR1; trap "" TERM; scontrol requeue "$SLURM_JOB_ID"; echo "requeue rc=$?"; exit 0' USR1
    touch first-run-waiting
    # Background + wait: bash only runs traps between commands, and `wait`
    # is interrupted by the signal while a foreground sleep would not be.
    sleep 100 & wait $!
    echo "not reached"; exit 1
fi
echo second-run > second-run.txt
"""


def test_requeue_from_usr1_trap(slurm: SlurmCluster, tmp_path: Path):
    script = tmp_path / "requeue.sbatch"
    script.write_text(REQUEUE_SCRIPT)
    t0 = time.monotonic()
    job = slurm.sbatch([str(script)], cwd=tmp_path)
    _wait_for_file(tmp_path / "first-run-waiting", slurm, job)
    _timed(slurm, "requeue test: submit -> first run waiting", t0)

    t1 = time.monotonic()
    # What SLURM does for --signal=B:USR1@N: signal the batch shell only.
    slurm.scancel("--signal=USR1", "--batch", job)
    assert slurm.wait(job, timeout=30) == "COMPLETED", slurm.debug_report(job)
    secs = _timed(slurm, "requeue test: USR1 -> requeued run completed", t1)

    rec = slurm.job(job)
    assert rec["Restarts"] == "1"
    assert (tmp_path / "second-run.txt").read_text().strip() == "second-run"
    log = slurm.read_stdout(job)
    assert "start restart=0" in log and "got USR1" in log and "start restart=1" in log
    assert "not reached" not in log
    # BeginTime of a requeued job is now + cred_expire + 1 (see slurm.conf).
    assert secs >= slurm.cred_expire


# --------------------------------------------------------------------------- #
# Part 2: slurm/submit.sh + komt-array.sbatch + komt-merge.sbatch
# --------------------------------------------------------------------------- #

# Mimics the komt-batch contract the sbatch scripts rely on:
#   run:   exit 0 when done; blocks (like a long generation) for tasks listed
#          in FAKE_BLOCK_TASKS until USR1/TERM, then "checkpoints" and exits
#          75; a task with a checkpoint finishes at once; tasks listed in
#          FAKE_FAIL_TASKS exit 1.
#   merge: exit 0 when every shard is done, else 1 with the missing list.
#   plan:  stores "the plan" (exit 0), or fails (exit 2) with FAKE_PLAN_FAILS; run refuses to
#          start without it, so a task that ran before submit.sh planned fails.
# Every call records its argv (one per line) in $FAKE_STATE/<cmd>-<task>-<restart>.args.
FAKE_KOMT_BATCH = r"""#!/bin/bash
set -u
state=${FAKE_STATE:?}
sub=$1
task=${SLURM_ARRAY_TASK_ID:-x}
restart=${SLURM_RESTART_COUNT:-0}
printf '%s\n' "$@" > "$state/$sub-$task-$restart.args"
case $sub in
plan)
    if [[ -n ${FAKE_PLAN_FAILS:-} ]]; then echo "fake plan: the plan fails" >&2; exit 2; fi
    touch "$state/planned"; echo "fake plan: stored"; exit 0
    ;;
run)
    if [[ ! -e $state/planned ]]; then echo "fake run: no plan stored yet"; exit 1; fi
    if [[ " ${FAKE_FAIL_TASKS:-} " == *" $task "* ]]; then
        echo "fake run: task $task fails"; exit 1
    fi
    if [[ -e $state/checkpoint-$task ]]; then
        echo "fake run: task $task resumes from its checkpoint"; touch "$state/done-$task"; exit 0
    fi
    if [[ " ${FAKE_BLOCK_TASKS:-} " != *" $task "* ]]; then
        echo "fake run: task $task done"; touch "$state/done-$task"; exit 0
    fi
    trap 'echo "fake run: task $task got a signal, checkpointing"; touch "$state/checkpoint-$task"; exit 75' USR1 TERM
    touch "$state/running-$task-$restart"
    while :; do sleep 0.2 & wait $!; done
    ;;
merge)
    missing=""
    for ((i = 0; i < ${FAKE_N:?}; i++)); do [[ -e $state/done-$i ]] || missing+=" $i"; done
    if [[ -n $missing ]]; then echo "fake merge: missing shards:$missing"; exit 1; fi
    echo "fake merge: ok"; touch "$state/merged"; exit 0
    ;;
esac
echo "fake: unknown command $sub"; exit 2
"""


class Submission:
    """Runs slurm/submit.sh JOB.yaml N in ``workdir`` and parses its output.

    By default KOMT_BATCH is the fake above; pass ``komt_batch`` (and
    ``job_text``) to run something real.
    """

    def __init__(self, cluster: SlurmCluster, workdir: Path, n: int, *,
                 komt_batch: str | None = None, job_text: str | None = None, check: bool = True, **env: str):
        self.cluster = cluster
        self.workdir = workdir
        self.state = workdir / "fake-state"
        self.state.mkdir()
        if komt_batch is None:
            fake = workdir / "fake-komt-batch"
            fake.write_text(FAKE_KOMT_BATCH)
            fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
            komt_batch = str(fake)
        self.job_file = workdir / "job.yaml"
        self.job_file.write_text(job_text or "# stand-in job file; the fake CLI does not read it\n")
        self.env = {
            "KOMT_BATCH": komt_batch, "FAKE_STATE": str(self.state), "FAKE_N": str(n),
            "GPUS_PER_TASK": "0",  # the test node has no GPUs
            **env,
        }
        t0 = time.monotonic()
        # --time=10: must stay well above the 300 s of --signal=B:USR1@300,
        # or SLURM sends the checkpoint warning right at start.
        proc = cluster.run(["bash", str(SUBMIT), "job.yaml", str(n),
                            "--time=10", "--cpus-per-task=1", "--mem=100M"],
                           cwd=workdir, env=self.env, check=False)
        self.proc = proc
        if not check:
            return
        assert proc.returncode == 0, f"submit.sh failed:\n{proc.stdout}\n{proc.stderr}"
        self.submit_seconds = time.monotonic() - t0
        self.lines = proc.stdout.strip().splitlines()
        assert self.lines[0].startswith("array job: "), proc.stdout
        assert self.lines[1].startswith("merge job: "), proc.stdout
        self.array_id = self.lines[0].split(": ", 1)[1]
        self.merge_id = self.lines[1].split(": ", 1)[1]
        assert self.lines[-1] == self.merge_id

    def task(self, i: int) -> dict[str, str]:
        return self.cluster.job(f"{self.array_id}_{i}")

    def task_log(self, i: int) -> str:
        path = self.workdir / "logs" / f"komt-batch-{self.array_id}_{i}.out"
        return path.read_text() if path.exists() else ""

    def merge_log(self) -> str:
        path = self.workdir / "logs" / f"komt-merge-{self.merge_id}.out"
        return path.read_text() if path.exists() else ""

    def args(self, name: str) -> list[str]:
        return (self.state / f"{name}.args").read_text().splitlines()

    def report(self) -> str:
        return (self.cluster.debug_report(self.array_id) + "\n"
                + self.cluster.debug_report(self.merge_id))


def test_submit_requeue_on_usr1_then_merge(slurm: SlurmCluster, tmp_path: Path):
    t0 = time.monotonic()
    sub = Submission(slurm, tmp_path, 2, FAKE_BLOCK_TASKS="1",
                     KOMT_DATE="2001-02-03", KOMT_TIME="040506")
    print(f"[timing] submit.sh: {sub.submit_seconds:.2f}s")
    assert (tmp_path / "logs").is_dir()

    # Task 1 blocks like a long generation; the merge waits on both tasks.
    _wait_for_file(sub.state / "running-1-0", slurm, sub.array_id)
    assert slurm.job(sub.merge_id)["JobState"] == "PENDING"
    t1 = time.monotonic()
    slurm.scancel("--signal=USR1", "--batch", f"{sub.array_id}_1")

    assert slurm.wait(sub.merge_id, timeout=45) == "COMPLETED", sub.report()
    _timed(slurm, "submit.sh: USR1 -> requeue -> merge done", t1)
    _timed(slurm, "submit.sh: whole requeue scenario", t0)

    t_0, t_1, merge = sub.task(0), sub.task(1), slurm.job(sub.merge_id)
    assert (t_0["JobState"], t_0["Restarts"]) == ("COMPLETED", "0")
    assert (t_1["JobState"], t_1["Restarts"]) == ("COMPLETED", "1")
    # ISO timestamps compare as strings; the merge starts after the last task.
    assert merge["StartTime"] >= max(t_0["EndTime"], t_1["EndTime"])
    assert (sub.state / "merged").exists()

    # One run key ({job_id}, {date}, {time}) for all tasks, the requeued run
    # and the merge; the merge also learns the shard count.
    key = ["--run-id", sub.array_id, "--date", "2001-02-03", "--time", "040506"]
    job_path = str(tmp_path / "job.yaml")
    assert sub.args("run-0-0") == ["run", *key, job_path]
    assert sub.args("run-1-0") == ["run", *key, job_path]
    assert sub.args("run-1-1") == ["run", *key, job_path]
    assert sub.args("merge-x-0") == ["merge", *key, "--shards", "2", job_path]
    assert sub.args("plan-x-0") == ["plan", *key, job_path]  # once, before any task ran

    log1 = sub.task_log(1)
    assert "got SIGUSR1, forwarding to komt-batch" in log1
    assert "komt-batch exited with code 75" in log1
    assert "requeued (restart 1 of at most 20)" in log1
    assert "resuming after requeue #1" in log1      # second run appended (open-mode=append)
    assert "shard done" in log1
    assert "merge done" in sub.merge_log()


def test_submit_failed_task_is_not_requeued_and_merge_never_runs(
        slurm: SlurmCluster, tmp_path: Path):
    t0 = time.monotonic()
    sub = Submission(slurm, tmp_path, 2, FAKE_FAIL_TASKS="1")
    assert slurm.wait(sub.array_id, timeout=30) == "COMPLETED,FAILED", sub.report()
    t_1 = sub.task(1)
    assert (t_1["JobState"], t_1["ExitCode"], t_1["Restarts"]) == ("FAILED", "1:0", "0")
    # --kill-on-invalid-dep=yes: cancelled rather than pending forever.
    assert slurm.wait(sub.merge_id, timeout=15) == "CANCELLED", sub.report()
    assert slurm.job(sub.merge_id)["Reason"] == "DependencyNeverSatisfied"
    _timed(slurm, "submit.sh: failed task -> merge cancelled", t0)

    assert not (sub.state / "merge-x-0.args").exists()
    assert sub.merge_log() == ""
    assert "komt-batch failed (exit 1); not requeueing" in sub.task_log(1)
    # Default {date}/{time}: computed by submit.sh, the same for every task.
    args0, args1 = sub.args("run-0-0"), sub.args("run-1-0")
    assert args0 == args1
    assert args0[3] == "--date" and args0[5] == "--time"
    assert args0[4] in {time.strftime("%F"), time.strftime("%F", time.localtime(time.time() - 60))}
    assert len(args0[6]) == 6 and args0[6].isdigit()


def test_submit_plans_once_and_a_failing_plan_cancels_everything(slurm: SlurmCluster, tmp_path: Path):
    sub = Submission(slurm, tmp_path, 2, check=False, FAKE_PLAN_FAILS="1")
    assert sub.proc.returncode == 1, sub.proc.stdout + sub.proc.stderr
    assert "fake plan: the plan fails" in sub.proc.stderr and "planning failed" in sub.proc.stderr
    array_id = sub.proc.stdout.splitlines()[0].split(": ", 1)[1]
    merge_id = sub.proc.stdout.splitlines()[1].split(": ", 1)[1]
    assert slurm.wait(array_id, timeout=20) == "CANCELLED"
    assert slurm.wait(merge_id, timeout=20) == "CANCELLED"
    assert not list(sub.state.glob("run-*.args"))  # no task ever started


def test_submit_requeue_cap(slurm: SlurmCluster, tmp_path: Path):
    sub = Submission(slurm, tmp_path, 1, FAKE_BLOCK_TASKS="0", KOMT_MAX_REQUEUES="0")
    _wait_for_file(sub.state / "running-0-0", slurm, sub.array_id)
    slurm.scancel("--signal=USR1", "--batch", f"{sub.array_id}_0")
    assert slurm.wait(sub.array_id, timeout=20) == "FAILED", sub.report()
    t_0 = sub.task(0)
    assert (t_0["ExitCode"], t_0["Restarts"]) == ("75:0", "0")
    assert "requeue cap reached" in sub.task_log(0)
    assert slurm.wait(sub.merge_id, timeout=15) == "CANCELLED"


def test_submit_scancel_is_not_undone_by_requeue(slurm: SlurmCluster, tmp_path: Path):
    """scancel SIGTERMs the job; komt-batch checkpoints and exits 75, and the
    script must NOT requeue: `scontrol requeue` would revive a CANCELLED job."""
    sub = Submission(slurm, tmp_path, 1, FAKE_BLOCK_TASKS="0")
    _wait_for_file(sub.state / "running-0-0", slurm, sub.array_id)
    slurm.scancel(f"{sub.array_id}_0")
    assert slurm.wait(sub.array_id, timeout=20) == "CANCELLED", sub.report()
    time.sleep(1)  # a requeue would show up as Restarts=1 / PENDING by now
    t_0 = sub.task(0)
    assert (t_0["JobState"], t_0["Restarts"]) == ("CANCELLED", "0"), sub.report()
    log = sub.task_log(0)
    assert "got SIGTERM" in log and "not requeueing" in log, log
    assert (sub.state / "checkpoint-0").exists()
    assert slurm.wait(sub.merge_id, timeout=15) == "CANCELLED"


def test_submit_sh_usage_errors(tmp_path: Path):
    """No cluster needed: argument checks happen before any sbatch call."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SUBMIT), *args], cwd=tmp_path, text=True,
                              capture_output=True, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert run().returncode == 2
    assert "usage:" in run("only-one").stderr
    assert "job file not found" in run("missing.yaml", "2").stderr
    (tmp_path / "j.yaml").write_text("x: 1\n")
    assert "N must be a positive integer" in run("j.yaml", "0").stderr
    assert not (tmp_path / "logs").exists()
    help = run("--help")
    assert help.returncode == 0 and "Environment knobs:" in help.stdout and "KOMT_MAX_REQUEUES" in help.stdout


@pytest.mark.parametrize("env, error", [
    ({"KOMT_ARRAY_LIMIT": "abc"}, "KOMT_ARRAY_LIMIT must be a positive integer, got 'abc'"),
    ({"KOMT_MAX_REQUEUES": "abc"}, "KOMT_MAX_REQUEUES must be a whole number, got 'abc'"),
    ({"PATH": "TOOLS"}, "sbatch not found"),  # (a PATH of the script's other tools only)
])
def test_submit_sh_refuses_a_bad_setting_before_any_sbatch_call(tmp_path: Path, env, error):
    """No cluster needed; nothing made (not even logs/)."""
    (tmp_path / "j.yaml").write_text("x: 1\n")
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("dirname", "realpath", "date", "mkdir", "sed"):
        (tools / tool).symlink_to(shutil.which(tool))
    env = {k: str(tools) if v == "TOOLS" else v for k, v in env.items()}
    done = subprocess.run([shutil.which("bash"), str(SUBMIT), "j.yaml", "2"], cwd=tmp_path, text=True, capture_output=True,
                          env={**os.environ, **env})
    assert done.returncode == 2 and done.stderr.startswith(error), done.stderr
    assert not (tmp_path / "logs").exists()


def test_the_array_script_refuses_a_requeue_cap_that_is_not_a_number(tmp_path: Path):
    """Before komt-batch runs: after its checkpoint the count would end the task without a requeue."""
    env = {**os.environ, "SLURM_JOB_ID": "7", "KOMT_JOB": str(tmp_path / "j.yaml"), "KOMT_MAX_REQUEUES": "abc"}
    done = subprocess.run(["bash", str(REPO / "slurm" / "komt-array.sbatch")], cwd=tmp_path, text=True, capture_output=True, env=env)
    assert done.returncode == 2 and "ERROR: KOMT_MAX_REQUEUES must be a whole number, got 'abc'" in done.stdout + done.stderr
