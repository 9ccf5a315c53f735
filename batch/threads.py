"""The job's CPU threads: how many intra-op threads torch runs, how OpenMP's idle threads wait, and
fewer threads while other processes take the CPUs.

PyTorch's default is one thread per core of the machine, and OpenMP threads that spin a while at
every barrier. When another process takes a core, the thread that lost it holds up every op while
its siblings burn the remaining core spinning: measured here (2 cores, a busy machine) 8-15x slower
than one thread. Idle threads that sleep instead (OMP_WAIT_POLICY=passive) do not collapse, but are
slow to wake for a decode step's many small ops (~0.6x the default's pace on a quiet machine). So
the job runs as many threads as CPUs it may use -- its affinity mask, a cgroup CPU quota (containers,
SLURM), SLURM_CPUS_PER_TASK, the smallest wins -- with OpenMP's default waiting, and `Watch`, called
between decode steps, lowers the threads while other processes use those CPUs and raises them again
once they have been quiet for a while. libgomp reads OMP_WAIT_POLICY once, when torch loads it, so
`before_torch` runs before torch is imported (the CLI calls it), `apply` before the model loads.
`cpu.threads` / `cpu.wait_policy` in the job file (or as overrides) set either, and so do the usual
OMP_NUM_THREADS / OMP_WAIT_POLICY variables when the job file leaves them unset; either set by the
user turns the watching off (the user chose).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from batch.config import CpuConfig

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Choice:
    threads: int
    wait_policy: str  # passive | active | default (OpenMP's own: spin a while, then sleep)
    why: str  # what decided the threads, for the log line
    adapt: bool = False  # fewer threads while other processes use the CPUs (Watch)


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
    OMP_WAIT_POLICY when set, else one thread per usable CPU. When the job chooses both (and has more
    than one CPU), OpenMP waits its default way and the threads adapt to the other processes (Watch);
    otherwise OpenMP's threads wait passively (nothing reacts when others take the cores)."""
    n, limits = usable_cpus(affinity, slurm_cpus_per_task, quota)
    env_threads = environ.get("OMP_NUM_THREADS", "").strip()
    if cfg.threads is not None:
        threads, why = cfg.threads, f"cpu.threads; {n} CPUs usable: {limits}"
    elif env_threads.isdigit() and int(env_threads) >= 1:
        threads, why = int(env_threads), f"OMP_NUM_THREADS; {n} CPUs usable: {limits}"
    else:
        threads, why = n, f"the CPUs usable: {limits}"
    env_policy = environ.get("OMP_WAIT_POLICY", "").strip().lower()
    policy = cfg.wait_policy or (env_policy if env_policy in ("passive", "active") else None)
    adapt = policy is None and why.startswith("the CPUs usable") and threads > 1
    return Choice(threads, "default" if adapt else policy or "passive", why, adapt)


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
    and set OMP_WAIT_POLICY (unset: OpenMP's default) and OMP_NUM_THREADS for OpenMP to read when it
    starts. Quiet: `apply` says the choice, once the job is past its checks and about to load the
    model. With torch loaded already (komt-batch called in-process) it does nothing."""
    global _chosen
    if "torch" in sys.modules:
        return None
    choice = choose(cfg, len(os.sched_getaffinity(0)), os.environ.get("SLURM_CPUS_PER_TASK"), cgroup_quota(), os.environ)
    if choice.wait_policy == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)  # (a value OpenMP would not take: gone too)
    else:
        os.environ["OMP_WAIT_POLICY"] = choice.wait_policy.upper()
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    _chosen = (cfg, choice)
    return choice


def apply(cfg: CpuConfig) -> Choice:
    """Run torch on the threads chosen before it loaded, and say so in one line. Called in a process
    whose torch was loaded before (in-process): cpu.threads when set, else the threads as they are;
    OpenMP's wait policy stays as it started, and the threads do not adapt."""
    import torch

    if _chosen is not None and _chosen[0] == cfg:
        choice = _chosen[1]
        waits = "OpenMP threads wait as by default (a short spin)" if choice.wait_policy == "default" else f"OpenMP threads wait {choice.wait_policy}"
        if choice.adapt:
            waits += "; fewer while other processes use these CPUs"
    else:
        threads = cfg.threads or torch.get_num_threads()
        why = "cpu.threads" if cfg.threads else "as they were: torch was loaded before komt-batch ran"
        choice, waits = Choice(threads, "as it started", why), "OpenMP's wait policy as it started"
    torch.set_num_threads(choice.threads)
    print(f"komt-batch: cpu: {_threads(choice.threads)} ({choice.why}); {waits}", file=sys.stderr, flush=True)
    return choice


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


# --- fewer threads while other processes use the CPUs ------------------------------------------------

# Others' use of the job's CPUs, in cores, beyond the CPUs its chosen threads leave free: from
# BUSY_CORES on, the threads drop by the cores the others take (rounded), to 1 at least; back to the
# chosen count once it stayed below QUIET_CORES for QUIET_SECONDS (hysteresis: use between the two
# changes nothing). When the others come back within that quiet time after the threads went back,
# the next wait is twice as long, up to QUIET_SECONDS_MAX: a process that comes and goes makes a few
# lines, not one every few seconds. The thresholds are to be measured with tools/contention_bench.py;
# the reasoning: with OpenMP's default spinning, a thread that shares its core with another process
# holds up every barrier, so the job loses more than that thread's share of the work.
BUSY_CORES = 0.5
QUIET_CORES = 0.25
QUIET_SECONDS = 3.0
QUIET_SECONDS_MAX = 60.0
WINDOW_SECONDS = 1.0  # /proc is read at most this often; the others' use is an average over a window


@dataclass(frozen=True)
class Reading:
    """CPU time in seconds since boot: `busy` of the watched CPUs (all processes), `own` of the process."""

    at: float  # the clock when read
    busy: float
    own: float


def read_cpu(cpus: Iterable[int], at: float, proc: Path = Path("/proc"), pid: str = "self") -> Reading:
    """/proc/stat's busy time of CPUS (user, nice, system, irq, softirq, steal: guest time is in user's)
    and /proc/PID/stat's utime + stime (every thread of the process), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    wanted = {f"cpu{c}" for c in cpus}
    busy = 0
    for line in (proc / "stat").read_text().splitlines():
        name, *values = line.split()
        if name in wanted:
            user, nice, system, _idle, _iowait, irq, softirq, steal = ([int(v) for v in values] + [0] * 8)[:8]
            busy += user + nice + system + irq + softirq + steal
    fields = (proc / pid / "stat").read_text().rsplit(")", 1)[1].split()  # (the name before ")" may hold spaces)
    return Reading(at, busy / tick, (int(fields[11]) + int(fields[12])) / tick)  # fields 14 and 15: utime, stime


class Adapting:
    """The decision, window by window: the threads to run, from the other processes' use of the CPUs."""

    def __init__(self, chosen: int, cpus: int):
        self.chosen, self.cpus, self.threads = chosen, cpus, chosen
        self.spare = max(0, cpus - chosen)  # CPUs that the chosen threads leave to others
        self.up_since: float | None = None  # the start of the quieter windows in a row, while below `chosen`
        self.up_to = chosen  # the fewest threads those windows allow
        self.quiet_for = QUIET_SECONDS  # how long they must last
        self.raised_at = -math.inf  # when the threads last went back up
        self.lowered = 0  # times the threads were lowered (the summary's cpu_threads_lowered)

    def window(self, others: float, start: float, end: float) -> int | None:
        """The other processes used OTHERS cores of the CPUs from START to END: the new thread count
        when it changes, else None."""
        taken = others - self.spare
        if taken >= BUSY_CORES:
            want = max(1, self.chosen - math.floor(taken + 0.5))
        else:
            want = self.chosen if taken < QUIET_CORES else self.threads
        if want < self.threads:
            soon = end - self.raised_at <= self.quiet_for + (end - start)
            self.quiet_for = min(2 * self.quiet_for, QUIET_SECONDS_MAX) if soon else QUIET_SECONDS
            self.threads, self.up_since = want, None
            self.lowered += 1
            return want
        if want == self.threads:
            self.up_since = None
            return None
        if self.up_since is None:
            self.up_since, self.up_to = start, want
        self.up_to = min(self.up_to, want)  # (up to what every window of the quiet time allowed)
        if end - self.up_since < self.quiet_for:
            return None
        self.threads, self.up_since, self.raised_at = self.up_to, None, end
        return self.threads


class Watch:
    """Called between decode steps (Engine.between_steps): at most every WINDOW_SECONDS, the others'
    use of this process's CPUs over the last window (their busy time less the process's own) ->
    Adapting -> torch's threads, and one line when they change. Cheap between readings."""

    def __init__(self, chosen: int, cpus: frozenset[int], read=read_cpu, clock=time.monotonic, set_threads=None, say=None):
        self.adapting = Adapting(chosen, len(cpus))
        self.cpus, self.read, self.clock = cpus, read, clock
        self.set_threads = set_threads or _set_torch_threads
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.last: Reading | None = None
        self.due = -math.inf

    @classmethod
    def start(cls, choice: Choice) -> Watch | None:
        """A watch for the job's threads when they adapt (on Linux), with its first reading (taken
        before the model loads, the first window covers the loading: on a busy machine the threads
        drop at the first step); None otherwise."""
        if not choice.adapt or not sys.platform.startswith("linux"):
            return None
        watch = cls(choice.threads, frozenset(os.sched_getaffinity(0)))
        watch()
        return watch if watch.due != math.inf else None

    @property
    def lowered(self) -> int:
        return self.adapting.lowered

    def __call__(self) -> None:
        now = self.clock()
        if now < self.due:
            return
        try:
            reading = self.read(self.cpus, now)
        except (OSError, ValueError, IndexError):  # no /proc as expected: stop watching
            self.due = math.inf
            return
        self.due = now + WINDOW_SECONDS
        last, self.last = self.last, reading
        if last is None or reading.at <= last.at:
            return
        others = max(0.0, (reading.busy - last.busy) - (reading.own - last.own)) / (reading.at - last.at)
        threads = self.adapting.window(others, last.at, reading.at)
        if threads is not None:
            self.set_threads(threads)
            back = "back to " if threads == self.adapting.chosen else ""
            self.say(f"komt-batch: cpu: other processes use {others:.1f} of {self.adapting.cpus} cores: {back}{_threads(threads)}")


def _set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
