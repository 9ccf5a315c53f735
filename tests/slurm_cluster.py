"""A real, single-node SLURM cluster on localhost, as a pytest plugin.

Use it from any test module or conftest.py::

    pytest_plugins = ["tests.slurm_cluster"]

    def test_something(slurm_cluster, tmp_path):
        job = slurm_cluster.sbatch(["--wrap", "echo hi"], cwd=tmp_path)
        assert slurm_cluster.wait(job, timeout=30) == "COMPLETED"
        assert "hi" in slurm_cluster.read_stdout(job)

The fixture is session-scoped: one slurmctld + one slurmd for the whole run
(start-up takes ~2 s once the packages are installed, ~15 s more for the
apt-get install on a fresh machine).

What it does (see ``_ClusterRunner``):

* skips the test when not root or when SLURM is missing and cannot be
  installed (set ``KOMT_REQUIRE_SLURM=1`` to turn every such skip into a
  failure, e.g. in CI; set ``KOMT_SKIP_SLURM=1`` to skip without trying);
* installs ``slurmctld slurmd slurm-client munge`` with apt-get if missing;
* reuses a running munged, or starts one (and stops it again afterwards);
* writes a slurm.conf into a fresh temp dir, points ``SLURM_CONF`` at it for
  the daemons and for every client command (``os.environ`` for the session,
  restored afterwards), starts slurmctld and slurmd in the foreground as our
  own child processes and waits for the node to be ``idle``;
* at teardown cancels every job, waits for the job steps to go away and
  stops exactly the processes it started.

Debian 12 ships SLURM 22.05; the config below is tuned for that version
(see the comments in ``_slurm_conf`` for the why of each timing knob).
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = (
    "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel",
    "munged", "munge", "unmunge",
)
# Daemons live in /usr/sbin, which is not on every PATH (e.g. a plain user's).
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")

# Job states after which a job will not run again (unless someone requeues it).
# "COMPLETING" is not in here: scontrol shows it while the job's processes are
# still being cleaned up, so a job reported as e.g. CANCELLED is really over.
FINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
})

# Environment variables that would change what sbatch/squeue do if they leaked
# in from the caller (e.g. when pytest itself runs inside a SLURM job).
_LEAKY_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCANCEL_")

# Per-session timings, printed in the terminal summary when the fixture was used.
TIMINGS: dict[str, float] = {}


class SlurmClusterError(RuntimeError):
    """The test cluster could not be set up or did something unexpected."""


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #

def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + _SBIN_PATH)


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def _skip_or_fail(reason: str):
    """Skip, or fail when the environment says SLURM tests are mandatory."""
    if os.environ.get("KOMT_REQUIRE_SLURM", "") not in ("", "0"):
        pytest.fail(f"SLURM test cluster required (KOMT_REQUIRE_SLURM) but: {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    # Small race (the port could be taken before slurmctld binds it), but it
    # avoids clashing with a real SLURM install or a leftover test cluster
    # on the default ports 6817/6818.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the daemon if the pytest process dies (even by SIGKILL).

    Safety net only; normal teardown stops the daemons explicitly.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 == PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort
        pass


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text[-lines:])


def _stop_process(proc: subprocess.Popen, name: str, timeout: float = 15.0) -> None:
    """SIGTERM one process we started, SIGKILL it if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


_FIELD_RE = re.compile(r"(?:^|\s)([A-Za-z][\w:/.]*)=")


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Parse one ``scontrol show job -o`` line into a dict.

    Values may contain spaces (paths, Command=...), so split only where
    whitespace is followed by ``Key=``.
    """
    matches = list(_FIELD_RE.finditer(line))
    out: dict[str, str] = {}
    for m, nxt in zip(matches, matches[1:] + [None]):
        end = nxt.start() if nxt is not None else len(line)
        out.setdefault(m.group(1), line[m.end():end].strip())
    return out


# --------------------------------------------------------------------------- #
# the object tests get
# --------------------------------------------------------------------------- #

@dataclass
class SlurmCluster:
    """Handle on the running test cluster, handed to tests by ``slurm_cluster``."""

    root: Path                    # temp dir with slurm.conf, state, spool, logs
    conf: Path                    # the slurm.conf in use (also $SLURM_CONF)
    env: dict[str, str]           # environment for subprocess calls (has SLURM_CONF)
    nodename: str
    cred_expire: int              # seconds; a requeued job waits cred_expire + 1 s
    timings: dict[str, float] = field(default_factory=dict)

    # -- plumbing ----------------------------------------------------------- #
    def run(self, cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 30,
            cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
        """Run a command with the cluster's environment; text output captured."""
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        proc = subprocess.run(list(map(str, cmd)), cwd=cwd, env=full_env, text=True,
                              capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise SlurmClusterError(
                f"{shlex.join(map(str, cmd))} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    # -- submitting --------------------------------------------------------- #
    def sbatch(self, args: Sequence[str] | str, *, cwd: str | os.PathLike | None = None,
               env: dict[str, str] | None = None) -> str:
        """Submit with ``sbatch --parsable ARGS`` and return the job id.

        For an array this is the array job id (use ``f"{id}_{task}"`` for one
        task). ``cwd`` is the job's working directory (where relative
        ``--output`` paths land); defaults to ``root/work``.
        """
        if isinstance(args, str):
            args = shlex.split(args)
        cwd = Path(cwd) if cwd is not None else self.root / "work"
        cwd.mkdir(parents=True, exist_ok=True)
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip()
        # --parsable prints "jobid" or "jobid;cluster"
        return out.splitlines()[-1].split(";")[0]

    def scancel(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["scancel", *args], check=check)

    # -- looking ------------------------------------------------------------ #
    def jobs(self, job_id: str | int) -> list[dict[str, str]]:
        """All ``scontrol show job -o`` records for an id ([] if unknown).

        An array job id gives one record per task (plus one for the
        not-yet-started tasks, e.g. ``ArrayTaskId=2-5``).
        """
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return []
            raise SlurmClusterError(f"scontrol show job {job_id}: {proc.stderr.strip()}")
        return [parse_scontrol_record(line) for line in proc.stdout.splitlines() if line.strip()]

    def job(self, job_id: str | int) -> dict[str, str]:
        """The first ``scontrol show job -o`` record for an id (KeyError if unknown)."""
        records = self.jobs(job_id)
        if not records:
            raise KeyError(f"unknown job {job_id}")
        return records[0]

    def states(self, job_id: str | int) -> dict[str, str]:
        """``{"<array id>_<task>" or "<job id>": JobState}`` for every record."""
        out = {}
        for rec in self.jobs(job_id):
            if rec.get("ArrayJobId"):
                key = f"{rec['ArrayJobId']}_{rec.get('ArrayTaskId', '')}"
            else:
                key = rec.get("JobId", str(job_id))
            out[key] = rec.get("JobState", "")
        return out

    def state(self, job_id: str | int) -> str:
        """JobState of a job; for an array, the common state of all its
        tasks, or the sorted distinct states joined by "," when they differ."""
        found = sorted(set(self.states(job_id).values()))
        if not found:
            raise KeyError(f"unknown job {job_id}")
        return ",".join(found)

    def wait_until(self, job_id: str | int, predicate: Callable[[list[dict[str, str]]], bool],
                   timeout: float = 60, what: str = "condition", poll: float = 0.2,
                   ) -> list[dict[str, str]]:
        """Poll ``jobs(job_id)`` until ``predicate(records)`` is true; return the records."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while True:
            records = self.jobs(job_id)
            if records and predicate(records):
                return records
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {job_id}: {what} not reached within {timeout}s\n"
                    + self.debug_report(job_id))
            time.sleep(poll)

    def wait(self, job_id: str | int, timeout: float = 60, poll: float = 0.2) -> str:
        """Wait until the job (every task of an array) is in a final state;
        return ``state(job_id)``."""
        self.wait_until(job_id,
                        lambda recs: all(r.get("JobState") in FINAL_STATES for r in recs),
                        timeout=timeout, what="final state", poll=poll)
        return self.state(job_id)

    def squeue(self, *args: str) -> str:
        return self.run(["squeue", *args]).stdout

    def stdout_path(self, job_id: str | int) -> Path:
        """Path of the job's stdout log (``StdOut=`` with %j/%A/%a expanded
        by slurmctld). For an array id, pass ``f"{array_id}_{task}"``."""
        return Path(self.job(job_id)["StdOut"])

    def read_stdout(self, job_id: str | int) -> str:
        path = self.stdout_path(job_id)
        return path.read_text(errors="replace") if path.exists() else ""

    def debug_report(self, job_id: str | int | None = None) -> str:
        """Queue, job records, job log and daemon log tails, for assertion messages."""
        parts = []
        try:
            parts.append("squeue:\n" + self.squeue("-o", "%i %T %r %j"))
        except Exception as exc:  # pragma: no cover - only used for diagnostics
            parts.append(f"squeue failed: {exc}")
        if job_id is not None:
            try:
                for rec in self.jobs(job_id):
                    keys = ("JobId", "ArrayJobId", "ArrayTaskId", "JobState", "Reason",
                            "Restarts", "ExitCode", "Dependency", "StdOut")
                    parts.append(" ".join(f"{k}={rec.get(k)}" for k in keys))
                    out = Path(rec.get("StdOut", ""))
                    if out.is_file():
                        parts.append(f"--- {out}:\n{_tail(out, 30)}")
            except Exception as exc:  # pragma: no cover
                parts.append(f"scontrol failed: {exc}")
        for name in ("slurmctld.log", "slurmd.log"):
            parts.append(f"--- {name} (tail):\n{_tail(self.root / 'log' / name, 15)}")
        return "\n".join(parts)

    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job in the queue and wait until the queue is empty."""
        ids = self.run(["squeue", "-h", "-o", "%A"], check=False).stdout.split()
        if ids:
            self.run(["scancel", *ids], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run(["squeue", "-h", "-o", "%A"], check=False).stdout.strip():
                return
            time.sleep(0.2)


# --------------------------------------------------------------------------- #
# setting the cluster up and tearing it down
# --------------------------------------------------------------------------- #

def _slurm_conf(*, root: Path, host: str, node_line: str, ctld_port: int, slurmd_port: int,
                cred_expire: int) -> str:
    return f"""\
# Generated by tests/slurm_cluster.py: a throw-away single-node cluster.
ClusterName=komt
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also the requeue delay: a requeued job gets
# BeginTime = now + cred_expire + 1. SLURM rejects values below 5
# ("AuthInfo=cred_expire=N invalid" in slurmd.log, and slurmctld silently
# falls back to the 120 s default), and `scontrol reconfigure` does not
# change it: restart the daemons.
AuthInfo=cred_expire={cred_expire}
MpiDefault=none
# No cgroups in this sandbox: track job processes via /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SelectType=select/cons_tres
# CR_Core: memory is not a consumable resource, so --mem only has to fit the
# node; with CR_Core_Memory a job without --mem would take the whole node.
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule new batch jobs at once, and run the main scheduling loop every
# second so that a requeued job starts ~1 s after its BeginTime (default 60 s).
SchedulerParameters=batch_sched_delay=0,sched_interval=1
# Keep finished jobs visible to `scontrol show job` for the whole session.
MinJobAge=3600
# SIGTERM -> SIGKILL grace period on cancel/requeue/time limit (default 30 s).
KillWait=5
ReturnToService=2
JobRequeue=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# From `slurmd -C` (the real hardware, or slurmd drains the node), plus an
# explicit address so nothing depends on the hostname resolving.
{node_line} NodeAddr=127.0.0.1
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class _ClusterRunner:
    """Owns everything the fixture starts, so teardown stops exactly that."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []   # (name, proc), start order
        self.munged: subprocess.Popen | None = None
        self.root: Path | None = None
        self.cluster: SlurmCluster | None = None

    # -- preconditions ---------------------------------------------------- #
    def check_and_install(self) -> None:
        if os.environ.get("KOMT_SKIP_SLURM", "") not in ("", "0"):
            pytest.skip("KOMT_SKIP_SLURM is set")
        if not sys.platform.startswith("linux"):
            _skip_or_fail("the SLURM test cluster needs Linux")
        if os.geteuid() != 0:
            _skip_or_fail("the SLURM test cluster needs root (daemons run as SlurmUser=root, "
                          "munged is started as user munge)")
        missing = _missing_binaries()
        if not missing:
            return
        if _which("apt-get") is None:
            _skip_or_fail(f"SLURM is not installed (missing: {', '.join(missing)}) "
                          "and there is no apt-get to install it")
        t0 = time.monotonic()
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": _SBIN_PATH}
        for cmd in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
            proc = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=900)
            if proc.returncode != 0:
                _skip_or_fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                              f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        TIMINGS["apt-get install"] = time.monotonic() - t0
        missing = _missing_binaries()
        if missing:
            _skip_or_fail(f"still missing after apt-get install: {', '.join(missing)}")

    # -- munge ------------------------------------------------------------- #
    @staticmethod
    def _munge_works() -> bool:
        try:
            cred = subprocess.run([_which("munge") or "munge", "-n"], capture_output=True,
                                  timeout=10)
            if cred.returncode != 0:
                return False
            check = subprocess.run([_which("unmunge") or "unmunge"], input=cred.stdout,
                                   capture_output=True, timeout=10)
            return check.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def ensure_munge(self, logdir: Path) -> None:
        if self._munge_works():
            return  # someone else's munged: reuse it, never stop it
        t0 = time.monotonic()
        if not MUNGE_KEY.exists():
            # The Debian package creates the key at install time; only needed
            # if someone deleted it.
            subprocess.run([_which("mungekey") or "mungekey", "--create", "--keyfile",
                            str(MUNGE_KEY)], check=True, capture_output=True)
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o600)
        # /run is a tmpfs on real machines: the socket dir vanishes at reboot
        # and nothing (no systemd here) recreates it.
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755",
                        str(MUNGE_SOCKET_DIR)], check=True)
        # Foreground munged as a direct child (instead of `runuser -u munge --
        # munged`, which daemonises) so that we own its PID and can stop it.
        log = open(logdir / "munged.stderr", "ab")
        self.munged = subprocess.Popen(
            [_which("munged") or "munged", "--foreground"], user="munge", group="munge",
            extra_groups=[], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + 10
        while not self._munge_works():
            if self.munged.poll() is not None or time.monotonic() > deadline:
                raise SlurmClusterError(
                    f"munged did not come up (rc={self.munged.poll()}):\n"
                    + _tail(logdir / "munged.stderr"))
            time.sleep(0.1)
        TIMINGS["munged start (ours)"] = time.monotonic() - t0

    # -- slurm daemons ------------------------------------------------------ #
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        assert self.root is not None
        log = open(self.root / "log" / f"{name}.stderr", "ab")
        # -D: stay in the foreground, so the PID we get is the daemon's.
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        log.close()
        self.procs.append((name, proc))
        return proc

    def start(self) -> SlurmCluster:
        t0 = time.monotonic()
        # Short path under /tmp: slurmstepd puts unix sockets in SlurmdSpoolDir
        # and sun_path is limited to 108 bytes (pytest's tmp_path can be long).
        self.root = Path(tempfile.mkdtemp(prefix="komt-slurm-", dir="/tmp"))
        for sub in ("state", "spool", "log", "run", "work"):
            (self.root / sub).mkdir()
        self.ensure_munge(self.root / "log")

        host = socket.gethostname().split(".")[0]
        node_line = subprocess.run([_which("slurmd") or "slurmd", "-C"], capture_output=True,
                                   text=True, check=True).stdout.splitlines()[0].strip()
        nodename = node_line.split()[0].split("=", 1)[1]
        cred_expire = 5
        conf = self.root / "slurm.conf"
        conf.write_text(_slurm_conf(root=self.root, host=host, node_line=node_line,
                                    ctld_port=_free_port(), slurmd_port=_free_port(),
                                    cred_expire=cred_expire))

        env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_ENV_PREFIXES)}
        env["SLURM_CONF"] = str(conf)
        env["PATH"] = env.get("PATH", "") + ":" + _SBIN_PATH

        self._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-f", str(conf)], env)
        # -N: the node name must match NodeName= even if the hostname differs.
        self._spawn("slurmd", [_which("slurmd") or "slurmd", "-D", "-f", str(conf),
                               "-N", nodename], env)
        self.cluster = SlurmCluster(root=self.root, conf=conf, env=env, nodename=nodename,
                                    cred_expire=cred_expire)
        self._wait_idle(timeout=30)
        TIMINGS["cluster start (node idle)"] = time.monotonic() - t0
        # `sinfo` says idle almost at once, but slurmctld only starts
        # scheduling ~3 s after it came up, and a job that actually runs is the
        # only proof that munge credentials, slurmd and slurmstepd all work.
        t1 = time.monotonic()
        warmup = self.cluster.sbatch(["--job-name=warmup", "--output=/dev/null", "--wrap", "true"])
        state = self.cluster.wait(warmup, timeout=30)
        if state != "COMPLETED":
            raise SlurmClusterError(f"warm-up job ended {state}\n" + self.cluster.debug_report(warmup))
        TIMINGS["cluster start (warm-up job)"] = time.monotonic() - t1
        self.cluster.timings = TIMINGS
        return self.cluster

    def _wait_idle(self, timeout: float) -> None:
        assert self.cluster is not None
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise SlurmClusterError(
                        f"{name} exited with {proc.returncode} during start-up:\n"
                        + _tail(self.root / "log" / f"{name}.stderr")
                        + "\n" + _tail(self.root / "log" / f"{name}.log"))
            proc = self.cluster.run(["sinfo", "-h", "-o", "%T"], check=False, timeout=10)
            state = proc.stdout.strip()
            if proc.returncode == 0 and state == "idle":
                return
            time.sleep(0.2)
        raise SlurmClusterError(f"node not idle after {timeout}s (sinfo: {state!r})\n"
                                + self.cluster.debug_report())

    def stop(self) -> None:
        if self.cluster is not None and all(p.poll() is None for _, p in self.procs):
            try:
                self.cluster.cancel_all(timeout=20)
                self._wait_steps_gone(timeout=20)
            except Exception:
                pass  # still stop the daemons below
        # slurmd before slurmctld (reverse start order), then munged if ours.
        for name, proc in reversed(self.procs):
            _stop_process(proc, name)
        self.procs.clear()
        if self.munged is not None:
            _stop_process(self.munged, "munged")
            self.munged = None
        if self.root is not None and os.environ.get("KOMT_SLURM_KEEP", "") in ("", "0"):
            shutil.rmtree(self.root, ignore_errors=True)

    def _wait_steps_gone(self, timeout: float) -> None:
        # slurmstepd (one per running job step) is not our child: slurmd
        # double-forks it. Each one keeps a socket "<node>_<job>.<step>" in the
        # spool dir while alive, which tells us when they are all gone.
        assert self.root is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not [p for p in (self.root / "spool").iterdir() if p.is_socket()]:
                return
            time.sleep(0.2)


# --------------------------------------------------------------------------- #
# pytest glue
# --------------------------------------------------------------------------- #

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slurm: needs the real single-node SLURM cluster (tests/slurm_cluster.py)")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterable[SlurmCluster]:
    """A running single-node SLURM cluster; SLURM_CONF is exported while it lives."""
    runner = _ClusterRunner()
    runner.check_and_install()
    with pytest.MonkeyPatch.context() as mp:
        try:
            cluster = runner.start()
            # Every client command run by the tests (subprocess with the
            # inherited environment, submit.sh, ...) must talk to this cluster.
            for key in list(os.environ):
                if key.startswith(_LEAKY_ENV_PREFIXES):
                    mp.delenv(key)
            mp.setenv("SLURM_CONF", str(cluster.conf))
            yield cluster
        finally:
            runner.stop()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if TIMINGS:
        terminalreporter.write_sep("-", "slurm test cluster")
        for key, secs in TIMINGS.items():
            terminalreporter.write_line(f"{key}: {secs:.1f}s")
