"""The job's CPU threads: how many intra-op threads torch runs, and how OpenMP's idle threads wait.

PyTorch's default is one thread per core of the machine, and OpenMP threads that spin at every
barrier. When another process takes a core, the thread that lost it holds up every op while its
siblings burn the remaining core spinning: measured here (2 cores, a busy machine) 8-15x slower
than one thread. So the job runs as many threads as CPUs it may use -- its affinity mask, a cgroup
CPU quota (containers, SLURM), SLURM_CPUS_PER_TASK, the smallest wins -- and lets idle OpenMP
threads sleep (OMP_WAIT_POLICY=passive) instead of spinning. libgomp reads OMP_WAIT_POLICY once,
when torch loads it, so `before_torch` runs before torch is imported (the CLI calls it), `apply`
before the model loads. `cpu.threads` / `cpu.wait_policy` in the job file (or as overrides) set
either; so do the usual OMP_NUM_THREADS / OMP_WAIT_POLICY variables when the job file leaves them unset.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from batch.config import CpuConfig

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Choice:
    threads: int
    wait_policy: str  # passive | active
    why: str  # what decided the threads, for the log line


def usable_cpus(affinity: int, slurm_cpus_per_task: str | None, quota: float | None) -> tuple[int, str]:
    """The CPUs this process may use, and which limit decided it: its affinity mask, a cgroup quota
    (rounded up: a quota of 1.5 CPUs still runs 2 threads part of the time) and SLURM_CPUS_PER_TASK."""
    limits = {"affinity": affinity}
    if quota is not None:
        limits["cgroup quota"] = max(1, math.ceil(quota - 1e-9))
    if slurm_cpus_per_task and slurm_cpus_per_task.strip().isdigit() and int(slurm_cpus_per_task) >= 1:
        limits["SLURM_CPUS_PER_TASK"] = int(slurm_cpus_per_task)
    n = min(limits.values())
    return n, ", ".join(f"{k} {v}" for k, v in limits.items())


def choose(cfg: CpuConfig, affinity: int, slurm_cpus_per_task: str | None, quota: float | None,
           environ: dict[str, str]) -> Choice:
    """The threads and wait policy: the job file's (or an override's) when set, else OMP_NUM_THREADS /
    OMP_WAIT_POLICY when set, else one thread per usable CPU, waiting passively."""
    n, limits = usable_cpus(affinity, slurm_cpus_per_task, quota)
    env_threads = environ.get("OMP_NUM_THREADS", "").strip()
    if cfg.threads is not None:
        threads, why = cfg.threads, f"cpu.threads; {n} CPUs usable: {limits}"
    elif env_threads.isdigit() and int(env_threads) >= 1:
        threads, why = int(env_threads), f"OMP_NUM_THREADS; {n} CPUs usable: {limits}"
    else:
        threads, why = n, f"the CPUs usable: {limits}"
    env_policy = environ.get("OMP_WAIT_POLICY", "").strip().lower()
    policy = cfg.wait_policy or (env_policy if env_policy in ("passive", "active") else "passive")
    return Choice(threads, policy, why)


def cgroup_quota(root: Path = CGROUP_ROOT, self_cgroup: str | None = None) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (quota / period), None when unlimited or
    unknown: cgroup v2's cpu.max ("200000 100000", or "max ..."), v1's cpu.cfs_quota_us (-1: none)
    over cpu.cfs_period_us; looked up at the process's own cgroup, then at the root (a container
    sees its own cgroup there)."""
    if self_cgroup is None:
        try:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            self_cgroup = ""
    v2, v1 = "", ""
    for line in self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = (controllers, path)
    candidates = []
    if v2:
        candidates += [(root / v2.lstrip("/") / "cpu.max", None), (root / "cpu.max", None)]
    if v1:
        controllers, path = v1
        for mount in (controllers, "cpu", "cpu,cpuacct"):
            for base in (root / mount / path.lstrip("/"), root / mount):
                candidates.append((base / "cpu.cfs_quota_us", base / "cpu.cfs_period_us"))
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
    return None


_chosen: tuple[CpuConfig, Choice] | None = None  # what `before_torch` chose, for which settings


def before_torch(cfg: CpuConfig) -> Choice | None:
    """While torch (hence OpenMP) is not loaded yet: choose from this process's CPUs and environment
    and set OMP_WAIT_POLICY and OMP_NUM_THREADS for OpenMP to read when it starts. Quiet: `apply`
    says the choice, once the job is past its checks and about to load the model. With torch loaded
    already (komt-batch called in-process) it does nothing."""
    global _chosen
    if "torch" in sys.modules:
        return None
    choice = choose(cfg, len(os.sched_getaffinity(0)), os.environ.get("SLURM_CPUS_PER_TASK"), cgroup_quota(), os.environ)
    os.environ["OMP_WAIT_POLICY"] = choice.wait_policy.upper()
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    _chosen = (cfg, choice)
    return choice


def apply(cfg: CpuConfig) -> Choice:
    """Run torch on the threads chosen before it loaded, and say so in one line. Called in a process
    whose torch was loaded before (in-process): cpu.threads when set, else the threads as they are;
    OpenMP's wait policy stays as it started."""
    import torch

    if _chosen is not None and _chosen[0] == cfg:
        choice, waits = _chosen[1], f"OpenMP threads wait {_chosen[1].wait_policy}"
    else:
        threads = cfg.threads or torch.get_num_threads()
        why = "cpu.threads" if cfg.threads else "as they were: torch was loaded before komt-batch ran"
        choice, waits = Choice(threads, "as it started", why), "OpenMP's wait policy as it started"
    torch.set_num_threads(choice.threads)
    print(f"komt-batch: cpu: {choice.threads} thread{'s' if choice.threads != 1 else ''} ({choice.why}); {waits}",
          file=sys.stderr, flush=True)
    return choice
