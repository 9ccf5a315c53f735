"""batch.threads.Watch: the job's threads while other processes share its CPUs. The decision from
fake /proc readings (table), and a real run beside a busy process pinned to the job's CPUs."""

from __future__ import annotations

import contextlib
import math
import os
import queue
import subprocess
import sys
import threading
import time
import warnings
from functools import partial
from pathlib import Path

import pytest

from batch.threads import QUIET_CORES, QUIET_SECONDS, Choice, Watch, cgroup_quota, read_cpu
from tests.conftest import ROOT, cli_env, input_rows, komt_argv, make_job, write_jsonl

TICK = os.sysconf("SC_CLK_TCK")


class FakeProc:
    """/proc/stat and /proc/self/stat under a folder (in whole clock ticks, as the kernel's), advanced
    window by window."""

    def __init__(self, root: Path, cpus: int):
        self.root, self.cpus = root, cpus
        self.busy = [0] * cpus  # ticks per CPU
        self.idle = [0] * cpus
        self.own = 0
        self.now = 100.0
        (root / "self").mkdir(parents=True)
        self.write()

    def advance(self, seconds: float, others: float, own: float, watched: int, elsewhere: float = 0.0) -> None:
        """SECONDS pass; other processes use OTHERS cores of the first WATCHED CPUs and ELSEWHERE cores
        of the rest, this process OWN cores (of the watched ones)."""
        def spread(cores: float, first: int, n: int) -> None:
            ticks = round(cores * seconds * TICK)
            for k in range(n):
                share = ticks // n + (k < ticks % n)
                self.busy[first + k] += share
                self.idle[first + k] += round(seconds * TICK) - share

        spread(others + own, 0, watched)
        if watched < self.cpus:
            spread(elsewhere, watched, self.cpus - watched)
        self.own += round(own * seconds * TICK)
        self.now += seconds
        self.write()

    def write(self) -> None:
        def line(name, busy, idle):  # user nice system idle iowait irq softirq steal guest guest_nice
            return f"{name} {busy // 2} 0 {busy - busy // 2} {idle} 0 0 0 0 0 0"

        lines = [line("cpu", sum(self.busy), sum(self.idle))] + [line(f"cpu{c}", b, i) for c, (b, i) in enumerate(zip(self.busy, self.idle))]
        (self.root / "stat").write_text("\n".join(lines) + "\nintr 1 2 3\nctxt 5\n")
        (self.root / "self" / "stat").write_text(f"4242 (python (komt) x) R 1 2 3 0 -1 0 1 2 3 4 {self.own // 3} {self.own - self.own // 3} 0 0 20 0 2 0 5\n")


# name: (CPUs on the machine, CPUs watched, threads chosen, windows: (seconds, others' cores, own cores[, others elsewhere]))
#       -> (the lines said, the threads at the end)
S = QUIET_SECONDS
SCENARIOS = {
    "quiet": (2, 2, 2, [(1, 0.1, 2.0)] * 8, ([], 2)),
    "one busy process": (2, 2, 2, [(1, 0.0, 2.0), (1, 0.67, 1.33), (1, 1.0, 1.0), (1, 1.0, 1.0)],
                         (["other processes use 0.7 of 2 cores: 1 thread"], 1)),
    "one busy process that ends": (2, 2, 2, [(1, 0.67, 1.33), (1, 1.0, 1.0), (1, 0.1, 1.0), (1, 0.0, 1.0), (S - 2, 0.0, 1.0), (1, 0.1, 1.0)],
                                   (["other processes use 0.7 of 2 cores: 1 thread", "other processes use 0.0 of 2 cores: back to 2 threads"], 2)),
    "two busy processes": (2, 2, 2, [(1, 1.0, 1.0), (1, 1.33, 0.67), (1, 1.33, 0.67)], (["other processes use 1.0 of 2 cores: 1 thread"], 1)),
    "two busy processes on 4 CPUs: one thread less, then two": (
        4, 4, 4, [(1, 1.33, 2.67), (1, 1.6, 2.4), (1, 2.0, 2.0), (1, 2.0, 2.0)],
        (["other processes use 1.3 of 4 cores: 3 threads", "other processes use 1.6 of 4 cores: 2 threads"], 2)),
    "one busy process on 64 CPUs": (64, 64, 64, [(1, 1.0, 63.0)] * 3, (["other processes use 1.0 of 64 cores: 63 threads"], 63)),
    "two busy processes on 64 CPUs, then one, then none: up by what every quiet window allowed": (
        64, 64, 64, [(1, 2.0, 62.0), (1, 0.9, 62.0), (1, 0.0, 62.0), (S - 1, 0.0, 62.0), (S, 0.0, 63.0)],
        (["other processes use 2.0 of 64 cores: 62 threads", "other processes use 0.0 of 64 cores: 63 threads",
          "other processes use 0.0 of 64 cores: back to 64 threads"], 64)),
    "flapping: busy and quiet every other second": (2, 2, 2, [(1, 0.8, 1.2), (1, 0.0, 1.0)] * 8, (["other processes use 0.8 of 2 cores: 1 thread"], 1)),
    "busy one second in four: the quiet wait doubles": (
        2, 2, 2, [(1, 0.0, 2.0)] + [(1, 1.0, 1.0), (S, 0.0, 1.0)] * 5 + [(S, 0.0, 1.0)],
        (["other processes use 1.0 of 2 cores: 1 thread", "other processes use 0.0 of 2 cores: back to 2 threads"] * 2, 2)),
    "busy again long after going back: the quiet wait is short again": (
        2, 2, 2, [(1, 1.0, 1.0), (S, 0.0, 1.0), (1, 1.0, 1.0), (2 * S, 0.0, 1.0), (100, 0.0, 2.0), (1, 1.0, 1.0), (S, 0.0, 1.0)],
        (["other processes use 1.0 of 2 cores: 1 thread", "other processes use 0.0 of 2 cores: back to 2 threads"] * 3, 2)),
    "between the thresholds, at 2 threads": (2, 2, 2, [(1, 0.4, 1.6)] * 8, ([], 2)),
    "between the thresholds, at 1 thread": (2, 2, 2, [(1, 0.9, 1.1)] + [(1, 0.3, 1.0)] * 8, (["other processes use 0.9 of 2 cores: 1 thread"], 1)),
    "quiet just short of the time, then busy again": (2, 2, 2, [(1, 0.9, 1.1), (S - 0.5, 0.0, 1.0), (1, 0.9, 1.0), (S - 0.5, 0.0, 1.0)],
                                                      (["other processes use 0.9 of 2 cores: 1 thread"], 1)),
    "busy on CPUs outside the job's": (4, 2, 2, [(1, 0.0, 2.0, 2.0)] * 4, ([], 2)),
    "its own threads are not others": (2, 2, 2, [(1, 0.0, 2.0)] * 4, ([], 2)),
    "a quota of 2 on 8 CPUs: others on the CPUs its threads leave": (8, 8, 2, [(1, 5.0, 2.0)] * 3 + [(1, 6.6, 1.4)], (["other processes use 6.6 of 8 cores: 1 thread"], 1)),
    "a long prefill between readings averages": (2, 2, 2, [(10, 0.6, 1.4)], (["other processes use 0.6 of 2 cores: 1 thread"], 1)),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_threads_follow_the_other_processes(tmp_path, name):
    machine, watched, chosen, windows, (lines, threads) = SCENARIOS[name]
    proc = FakeProc(tmp_path / "proc", machine)
    said, set_to = [], [chosen]
    watch = Watch(chosen, frozenset(range(watched)), read=partial(read_cpu, proc=proc.root), clock=lambda: proc.now,
                  set_threads=set_to.append, say=said.append)
    watch()  # the first reading
    for seconds, others, own, *elsewhere in windows:
        proc.advance(seconds, others, own, watched, *elsewhere)
        watch()
    assert [line.removeprefix("komt-batch: cpu: ") for line in said] == lines
    assert set_to[-1] == threads and len(set_to) == len(lines) + 1
    assert watch.lowered == sum(after < before for before, after in zip(set_to, set_to[1:]))


def test_between_readings_a_call_reads_nothing(tmp_path):
    proc = FakeProc(tmp_path / "proc", 2)
    reads = []

    def read(cpus, at):
        reads.append(at)
        return read_cpu(cpus, at, proc=proc.root)

    watch = Watch(2, frozenset({0, 1}), read=read, clock=lambda: proc.now, set_threads=lambda n: None, say=lambda s: None)
    for _ in range(1000):
        watch()
    proc.advance(0.5, 1.0, 1.0, 2)
    watch()
    proc.advance(0.5, 1.0, 1.0, 2)
    for _ in range(1000):
        watch()
    assert reads == [100.0, 101.0]


def test_no_proc_stops_the_watch_quietly(tmp_path):
    said = []
    watch = Watch(2, frozenset({0, 1}), read=partial(read_cpu, proc=tmp_path / "nothing"), clock=time.monotonic,
                  set_threads=said.append, say=said.append)
    watch()
    watch()
    assert said == [] and watch.due == math.inf


def test_nothing_is_watched_when_the_user_chose():
    assert Watch.start(Choice(2, "passive", "cpu.threads; 2 CPUs usable: affinity 2")) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watch reads /proc (Linux)")
def test_a_real_watch_starts_with_a_reading():
    watch = Watch.start(Choice(2, "default", "the CPUs usable: affinity 2", adapt=True))
    assert watch is not None and watch.last is not None and watch.last.own > 0


def test_the_runner_calls_the_watch_between_steps_and_counts_in_the_summary(tmp_path, monkeypatch, capsys):
    from batch import threads
    from batch.cli import main
    from batch.threads import Reading

    clock, set_to = iter(range(1_000_000)), []

    def start(choice):  # other processes use 1 of 2 cores in every window; a window per call
        watch = Watch(2, frozenset({0, 1}), read=lambda cpus, at: Reading(at, 2.0 * at, 1.0 * at), clock=lambda: float(next(clock)),
                      set_threads=set_to.append)
        watch()
        return watch

    monkeypatch.setattr(threads.Watch, "start", staticmethod(start))
    job = make_job(tmp_path, write_jsonl(tmp_path / "in.jsonl", input_rows(3, "w", "", 1)), generation={"max_new_tokens": 4})
    assert main(["run", str(job), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert dict(line.split(None, 1) for line in out.splitlines())["cpu_threads_lowered"] == "1"
    assert "komt-batch: cpu: other processes use 1.0 of 2 cores: 1 thread\n" in err and set_to == [1]


# --- a real run beside a busy process --------------------------------------------------------------


def lines_of(stream) -> queue.Queue:
    """The stream's lines as they come (None at its end), read by a thread."""
    q: queue.Queue = queue.Queue()

    def read():
        for line in stream:
            q.put(line.rstrip("\n"))
        q.put(None)

    threading.Thread(target=read, daemon=True).start()
    return q


DROP_SECONDS = 60  # the busy process beside it: the job drops to one thread within a second or so of generating
GIVE_UP_SECONDS = 30  # after the busy process ends, how long other work may keep the CPUs busy before the test stops waiting


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watch reads /proc (Linux)")
def test_beside_a_busy_process_the_job_drops_to_one_thread_and_comes_back(tmp_path):
    """The job on 2 CPUs, chosen by itself (no OMP_* variables): OpenMP's default waiting, 2 threads;
    a busy process pinned to the same CPUs makes it say it drops to one thread; once the process is
    killed and the CPUs are quiet, it says it is back to 2. The run is long by construction (2,000
    rows of 1,024 tokens each) and ends by SIGTERM once the lines are seen (exit 75). Other work may
    keep these CPUs busy after the kill (a shared machine): the test measures the CPUs as the job
    does, and fails only if they were quiet well longer than the job waits before going back; when
    they never were (GIVE_UP_SECONDS), going back is not checked, with a warning."""
    cpus = set(sorted(os.sched_getaffinity(0))[:2])
    if len(cpus) < 2 or (cgroup_quota() or 2) < 1.5:
        pytest.skip("one CPU (or a quota of one): nothing to adapt")

    def pin():
        os.sched_setaffinity(0, cpus)

    src = write_jsonl(tmp_path / "in.jsonl", input_rows(2000, "r", " 더", 7, digits=4))
    job = make_job(tmp_path, src, generation={"max_new_tokens": 1024, "min_new_tokens": 1024}, batching={"max_batch_size": 8})
    env = {k: v for k, v in cli_env(OMP_DISPLAY_ENV="verbose").items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "SLURM_CPUS_PER_TASK")}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pin)
    proc = subprocess.Popen(komt_argv("run", job, "--no-progress"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=pin)
    lines, seen, stopped = lines_of(proc.stderr), [], False
    try:
        def until(pattern: str, seconds: float = 600) -> str:
            end = time.monotonic() + seconds
            with contextlib.suppress(queue.Empty):
                while (line := lines.get(timeout=max(0.0, end - time.monotonic()))) is not None:
                    seen.append(line)
                    if line.startswith(pattern):
                        return line
            raise AssertionError(f"no {pattern!r} (the run: {proc.poll()}):\n" + "\n".join(seen[-30:]))

        chosen = until("komt-batch: cpu: ")
        assert chosen.startswith("komt-batch: cpu: 2 threads (the CPUs usable: affinity 2") and chosen.endswith(
            "); OpenMP threads wait as by default (a short spin); fewer while other processes use these CPUs"), chosen
        assert "  GOMP_SPINCOUNT = '300000'" in seen and "  OMP_NUM_THREADS = '2'" in seen  # OpenMP's own default waiting, unset
        until("komt-batch: generating ")
        dropped = until("komt-batch: cpu: other processes use ", DROP_SECONDS)
        assert dropped.endswith(" of 2 cores: 1 thread"), dropped
        busy.kill()
        busy.wait()

        # the line that it is back, while measuring the CPUs: the others' use = their busy time less the job's
        last = read_cpu(cpus, time.monotonic(), pid=str(proc.pid))
        give_up, quiet_since, back = last.at + GIVE_UP_SECONDS, None, None
        while back is None and last.at < give_up:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                break  # the run ended
            if line:
                seen.append(line)
                assert not line.startswith("komt-batch: cpu: other processes use ") or "back to 2 threads" in line, line
                back = line if "back to 2 threads" in line else None
            now = read_cpu(cpus, time.monotonic(), pid=str(proc.pid))
            if now.at - last.at >= 0.5:
                others = ((now.busy - last.busy) - (now.own - last.own)) / (now.at - last.at)
                if others >= QUIET_CORES:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = last.at
                last = now
                assert back or quiet_since is None or now.at - quiet_since < QUIET_SECONDS + 5, \
                    f"the CPUs were quiet for {now.at - quiet_since:.1f} s, and the job did not go back to 2 threads:\n" + "\n".join(seen[-30:])
        if back is None:
            warnings.warn(f"other work kept the CPUs busy for {GIVE_UP_SECONDS} s (or to the run's end): going back to 2 threads was not seen", stacklevel=1)
    finally:
        busy.kill()
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: the rows in flight finish and are committed
            stopped = True
        rc = proc.wait(timeout=600)
    assert rc == (75 if stopped else 0), "\n".join(seen[-30:])
