"""batch.threads: the job's CPU threads from the CPUs it may use (affinity, cgroup quota,
SLURM_CPUS_PER_TASK) and OpenMP's wait policy; the job file or an override changes either, the
choice is one log line, and OpenMP itself reports the setting (OMP_DISPLAY_ENV)."""

from __future__ import annotations

import os
import subprocess

import pytest

from batch.config import CpuConfig
from batch.threads import Choice, cgroup_quota, choose
from tests.conftest import ROOT, cli_env, input_rows, komt, komt_argv, make_job, read_output, write_jsonl

# name: (cpu settings, affinity, SLURM_CPUS_PER_TASK, cgroup quota, environment) -> (threads, policy, adapt, why starts with)
# The contract: when the job chooses both the threads and the waiting (and has more than one CPU),
# OpenMP waits its default way (OMP_WAIT_POLICY unset) and the threads adapt to other processes;
# when the user sets either (job file, override, OMP_* variable), nothing adapts and idle threads
# wait passively unless the user said otherwise.
CHOICES = {
    "a whole machine": ({}, 8, None, None, {}, (8, "default", True, "the CPUs usable: affinity 8")),
    "a narrower affinity mask": ({}, 2, None, None, {}, (2, "default", True, "the CPUs usable: affinity 2")),
    "one CPU: nothing to adapt": ({}, 1, None, None, {}, (1, "passive", False, "the CPUs usable: affinity 1")),
    "a SLURM task of 2 CPUs": ({}, 8, "2", None, {}, (2, "default", True, "the CPUs usable: affinity 8, SLURM_CPUS_PER_TASK 2")),
    "SLURM_CPUS_PER_TASK not a number": ({}, 4, "x", None, {}, (4, "default", True, "the CPUs usable: affinity 4")),
    "a cgroup quota of 1.5 CPUs (rounded up)": ({}, 8, None, 1.5, {}, (2, "default", True, "the CPUs usable: affinity 8, cgroup quota 2")),
    "a cgroup quota of half a CPU": ({}, 8, None, 0.5, {}, (1, "passive", False, "the CPUs usable: affinity 8, cgroup quota 1")),
    "a quota above the affinity": ({}, 2, "16", 4.0, {}, (2, "default", True, "the CPUs usable: affinity 2, cgroup quota 4, SLURM_CPUS_PER_TASK 16")),
    "OMP_NUM_THREADS set": ({}, 8, None, None, {"OMP_NUM_THREADS": "3"}, (3, "passive", False, "OMP_NUM_THREADS; 8 CPUs usable")),
    "OMP_NUM_THREADS not a number": ({}, 8, None, None, {"OMP_NUM_THREADS": "many"}, (8, "default", True, "the CPUs usable")),
    "OMP_WAIT_POLICY set": ({}, 2, None, None, {"OMP_WAIT_POLICY": "ACTIVE"}, (2, "active", False, "the CPUs usable")),
    "OMP_WAIT_POLICY not a policy": ({}, 2, None, None, {"OMP_WAIT_POLICY": "spin"}, (2, "default", True, "the CPUs usable")),
    "cpu.threads beats OMP_NUM_THREADS": ({"threads": 1}, 8, "4", None, {"OMP_NUM_THREADS": "3"}, (1, "passive", False, "cpu.threads; 4 CPUs usable")),
    "cpu.threads equal to the CPUs usable": ({"threads": 2}, 2, None, None, {}, (2, "passive", False, "cpu.threads; 2 CPUs usable")),
    "cpu.wait_policy beats OMP_WAIT_POLICY": ({"wait_policy": "passive"}, 2, None, None, {"OMP_WAIT_POLICY": "active"}, (2, "passive", False, "the CPUs")),
    "cpu.wait_policy active": ({"wait_policy": "active"}, 2, None, None, {}, (2, "active", False, "the CPUs")),
}


@pytest.mark.parametrize("name", list(CHOICES))
def test_the_choice_of_threads_and_waiting(name):
    settings, affinity, slurm, quota, environ, (threads, policy, adapt, why) = CHOICES[name]
    choice = choose(CpuConfig(**settings), affinity, slurm, quota, environ)
    assert (choice.threads, choice.wait_policy, choice.adapt) == (threads, policy, adapt)
    assert choice.why.startswith(why), choice.why


# name: (/proc/self/cgroup, files under the cgroup root) -> quota in CPUs
QUOTAS = {
    "v2, own cgroup": ("0::/slurm/job_7\n", {"slurm/job_7/cpu.max": "200000 100000\n", "cpu.max": "max 100000\n"}, 2.0),
    "v2, unlimited": ("0::/user.slice\n", {"user.slice/cpu.max": "max 100000\n"}, None),
    "v2, a container's root": ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),
    "v1, own cgroup": ("4:memory:/x\n3:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
                                                                    "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 0.5),
    "v1, unlimited": ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    "no cpu controller": ("4:memory:/x\n", {}, None),
}


@pytest.mark.parametrize("name", list(QUOTAS))
def test_the_cgroup_quota(tmp_path, name):
    self_cgroup, files, quota = QUOTAS[name]
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert cgroup_quota(tmp_path, self_cgroup) == quota


def openmp_settings(err: str) -> dict[str, str]:
    """What libgomp reports it uses (OMP_DISPLAY_ENV=true prints it to stderr when torch loads it)."""
    block = err.split("OPENMP DISPLAY ENVIRONMENT BEGIN")[1].split("OPENMP DISPLAY ENVIRONMENT END")[0]
    return {k.strip(): v.strip().strip("'") for k, _, v in (line.partition("=") for line in block.splitlines() if "=" in line)}


def cpu_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("komt-batch: cpu: ")]


def test_the_job_says_its_choice_once_and_openmp_takes_it(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", input_rows(4, "t", " 더", 3))
    job = make_job(tmp_path, src, generation={"max_new_tokens": 8})
    out = tmp_path / "out" / "result.parquet"

    # one CPU in its affinity mask, nothing in the environment: one thread
    env = {k: v for k, v in cli_env(OMP_DISPLAY_ENV="true").items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    p = subprocess.run(komt_argv("run", job, "--no-progress"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert p.returncode == 0, p.stderr
    assert cpu_lines(p.stderr) == ["komt-batch: cpu: 1 thread (the CPUs usable: affinity 1); OpenMP threads wait passive"]
    assert (openmp_settings(p.stderr)["OMP_NUM_THREADS"], openmp_settings(p.stderr)["OMP_WAIT_POLICY"]) == ("1", "PASSIVE")
    lines = p.stderr.splitlines()
    assert lines.index(cpu_lines(p.stderr)[0]) < next(i for i, x in enumerate(lines) if x.startswith("komt-batch: weights:"))  # before the model loads

    # the job file's key, and an override of it, win over OMP_NUM_THREADS
    job = make_job(tmp_path, src, generation={"max_new_tokens": 8}, cpu={"threads": 2})
    p = komt("run", job, "--no-progress", "--restart", "cpu.wait_policy=active", env=cli_env(OMP_DISPLAY_ENV="true", OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    (line,) = cpu_lines(p.stderr)
    assert line.startswith("komt-batch: cpu: 2 threads (cpu.threads; ") and line.endswith("; OpenMP threads wait active")
    assert (openmp_settings(p.stderr)["OMP_NUM_THREADS"], openmp_settings(p.stderr)["OMP_WAIT_POLICY"]) == ("2", "ACTIVE")
    p = komt("run", job, "--no-progress", "--restart", "cpu.threads=1", env=cli_env(OMP_DISPLAY_ENV="true"))
    assert cpu_lines(p.stderr)[0].startswith("komt-batch: cpu: 1 thread (cpu.threads; ")
    assert openmp_settings(p.stderr)["OMP_NUM_THREADS"] == "1" and openmp_settings(p.stderr)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert p.returncode == 0 and len(read_output(out)) == 4


@pytest.mark.parametrize("override, message", [
    ("cpu.threads=0", "cpu.threads: must be >= 1, got 0"),
    ("cpu.wait_policy=spin", "cpu.wait_policy: must be one of"),
])
def test_bad_cpu_settings_are_one_line_errors(tmp_path, override, message):
    job = make_job(tmp_path, write_jsonl(tmp_path / "in.jsonl", input_rows(2, "t", "", 1)))
    p = komt("validate", job, override)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
