"""Shared fixtures: the shipped tiny model, job files for it, and the CLI as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

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


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def komt(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m batch ARGS` as a real process; returns the completed process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "batch", *map(str, args)],
        cwd=cwd or ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_output(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(autouse=True, scope="session")
def _offline(tmp_path_factory):
    # the job's caches (converted inputs, weight hashes) go to a fresh folder, not the user's
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
