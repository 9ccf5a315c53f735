"""Shared fixtures: the shipped tiny model, job files for it, and the CLI as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

# offline in this process too: huggingface_hub reads HF_HUB_OFFLINE once, when the test modules import it
# (set later, a Hub id not in the cache would wait on the network's retries, about a minute)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny-komt"
SEED = ROOT / "data" / "seed_examples.jsonl"

pytest_plugins = ["tests.slurm_cluster"]  # the real SLURM cluster fixture (slurm_cluster)



def seed_rows() -> list[dict]:
    return [json.loads(line) for line in SEED.read_text(encoding="utf-8").splitlines()]


def make_job(tmp_path: Path, input_path: Path | str, name: str = "job.yaml", **sections) -> Path:
    """A job file for the tiny model (NF4 + adapter, float32 compute, greedy) with overrides per section."""
    job = {
        "model": {
            "base": str(TINY / "base"),
            "adapter": str(TINY / "adapter"),
            "quantization": "nf4",
            "compute_dtype": "float32",
            "device_map": "cpu",
        },
        "input": {"path": str(input_path), "id_column": "id"},
        "generation": {"max_new_tokens": 48, "do_sample": False},
        "batching": {"max_batch_size": 4, "max_batch_tokens": 4096},
        "output": {"path": str(tmp_path / "out" / "result.parquet")},
        "checkpoint": {"every_rows": 4},
    }
    for section, values in sections.items():
        job.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(job, allow_unicode=True))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def input_rows(n: int, prefix: str, extra: str, every: int, digits: int = 2) -> list[dict]:
    """n rows over the 9 seed instructions: ids PREFIX00.., row i's instruction + EXTRA * (i % EVERY)
    (so that the prompts differ in length)."""
    seeds = seed_rows()
    return [{"id": f"{prefix}{i:0{digits}d}", "instruction": seeds[i % 9]["instruction"] + extra * (i % every)} for i in range(n)]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a komt-batch process: offline, unbuffered, one OpenMP thread (on a shared
    machine, busy cores make torch's spinning worker threads 20x slower), then EXTRA."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def komt_argv(*args, script: Path | None = None) -> list[str]:
    """`python -m batch ARGS`, or `python SCRIPT ARGS` (a script that patches komt-batch, then runs it)."""
    return [sys.executable, *([str(script)] if script else ["-m", "batch"]), *map(str, args)]


def komt(*args, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None,
         script: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m batch ARGS` as a real process; returns the completed process (text output)."""
    return subprocess.run(
        komt_argv(*args, script=script),
        cwd=cwd or ROOT,
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn(*args, env: dict[str, str] | None = None, stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """Start `python -m batch ARGS` as a real process (text output) and return at once."""
    return subprocess.Popen(komt_argv(*args), cwd=ROOT, env=cli_env() if env is None else env, stdout=stdout, stderr=stderr, text=True)


def start(job, *args, **kwargs) -> subprocess.Popen:
    """Start `komt-batch run JOB --no-progress ARGS` (spawn's keywords) and return at once."""
    return spawn("run", job, "--no-progress", *args, **kwargs)


def wait_generating(proc: subprocess.Popen) -> None:
    """Read the process's stderr to the line that says it generates (it holds the job lock from
    before that line to its end)."""
    for line in proc.stderr:
        if line.startswith("komt-batch: generating"):
            return
    raise AssertionError(f"the run ended early: {proc.wait()}")


# komt-batch that stops itself (SIGSTOP) once PAUSE_AFTER_ROWS rows are finished, after saying so: the
# test then sends its SIGTERM at a known point of the run, whatever the CPU's speed
PAUSER = """
import os, signal, sys
from batch import engine
finish, finished = engine.Engine.finish, [0]

def finish_then_pause(self, *args):
    completion = finish(self, *args)
    finished[0] += 1
    if finished[0] == int(os.environ["PAUSE_AFTER_ROWS"]):
        print(f"PAUSED after {finished[0]} rows", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    return completion

engine.Engine.finish = finish_then_pause
from batch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_paused(job, after_rows: int, tmp_path: Path, *args) -> tuple[subprocess.Popen, list[str]]:
    """Start `komt-batch run JOB --no-progress ARGS` that stops itself (SIGSTOP) once AFTER_ROWS rows
    are finished; return once it is stopped, with the stderr lines it wrote until then."""
    script = tmp_path / "pauser.py"
    script.write_text(PAUSER)
    proc = subprocess.Popen(komt_argv("run", job, "--no-progress", *args, script=script), cwd=ROOT,
                            env=cli_env(PAUSE_AFTER_ROWS=str(after_rows)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("PAUSED"):
            break
    else:
        raise AssertionError(f"the run ended early: {proc.wait()}")
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":  # stopped (it says so just before)
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.001)
    return proc, lines


def one_line(capsys) -> str:
    """The one line on stderr since the last read: komt-batch's error message, no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("komt-batch: error: ") and "Traceback" not in err[0], err
    return err[0]


def summary(stdout: str) -> dict:
    """The `key  value` lines that run, status and merge print, as a dict."""
    return dict(line.split(None, 1) for line in stdout.splitlines() if line.strip())


def parts(out: Path) -> list[Path]:
    """The checkpoint's part files of the output OUT (in OUT.parts), by name."""
    d = out.with_name(out.name + ".parts")
    return sorted(d.glob("part-*.parquet")) if d.exists() else []


def part_rows(out: Path) -> int:
    """The rows committed in those part files."""
    return sum(pq.read_metadata(p).num_rows for p in parts(out))


def read_output(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(autouse=True, scope="session")
def _fresh_caches(tmp_path_factory):
    # the job's caches (converted inputs, weight hashes) go to a fresh folder, not the user's
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    # torch on one thread in this process too (the processes started get OMP_NUM_THREADS=1 from cli_env)
    import torch

    torch.set_num_threads(1)
