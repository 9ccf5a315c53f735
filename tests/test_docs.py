"""The documentation stays true: the job-file reference against the code's defaults, the README's
first commands run on the tiny model, links resolve, and no path of a particular machine is written
into the repository."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from batch.config import JobConfig, load_job

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
JOB_FILE_PAGE = ROOT / "docs" / "job-file.md"
PAGES = [README, *sorted((ROOT / "docs").glob("**/*.md")), ROOT / "slurm" / "NOTES.md"]


# --- (a) the job-file reference against batch/config.py ----------------------------------------


def code_keys(cls: type = JobConfig, prefix: str = "") -> dict[str, tuple[object, object]]:
    """Every key a job file may set, with its default and its type, walking the dataclasses
    (a section added to JobConfig, or a key added to a section, appears here by itself)."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.update(code_keys(tp, f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys[f"{prefix}{f.name}"] = (default, tp)
    return keys


DOCUMENTED_KEY = re.compile(r"^- `(?P<key>[a-z_]+(?:\.[a-z_]+)+)` = `(?P<default>[^`]*)`")


def documented_keys() -> dict[str, str]:
    """`section.key` = `default` at the start of a bullet of docs/job-file.md."""
    found = {}
    for line in JOB_FILE_PAGE.read_text(encoding="utf-8").splitlines():
        m = DOCUMENTED_KEY.match(line)
        if m:
            assert m["key"] not in found, f"docs/job-file.md lists {m['key']} twice"
            found[m["key"]] = m["default"]
    return found


def same_default(written: object, default: object, tp: object) -> bool:
    """The page's default, read as YAML (as a job file would give it), is the code's default."""
    if isinstance(default, bool) or isinstance(written, bool):
        return type(written) is type(default) and written == default
    if tp is float:
        return isinstance(written, (int, float)) and written == default
    return type(written) is type(default) and written == default


CODE_KEYS = code_keys()


@pytest.mark.parametrize("key", sorted(CODE_KEYS))
def test_every_key_of_the_job_file_is_documented_with_the_codes_default(key):
    documented = documented_keys()
    default, tp = CODE_KEYS[key]
    assert key in documented, (
        f"batch/config.py has the key {key} (default {default!r}); list it in docs/job-file.md as "
        f"'- `{key}` = `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` — meaning'"
    )
    written = yaml.safe_load(documented[key])
    assert same_default(written, default, tp), f"docs/job-file.md: {key} = {documented[key]!r}, the code's default is {default!r}"


def test_no_documented_key_is_unknown_to_the_code():
    unknown = sorted(set(documented_keys()) - set(CODE_KEYS))
    assert not unknown, f"docs/job-file.md lists keys batch/config.py does not have: {unknown}"


# Dotted names in backticks that look like job-file keys but are not (a method, a fingerprint's name).
NOT_KEYS = {"model.generate", "model.generate_batch", "model.adapter_files",
            "cpu.max", "cpu.cfs_quota_us", "cpu.cfs_period_us",  # (cgroup files, not the job's cpu section)
            "checkpoint.json",  # (the file in the checkpoint directory, not a key of the checkpoint section)
            "model.safetensors"}  # (transformers' weights file, not a key of the model section)


def test_every_job_file_key_named_in_the_pages_exists():
    sections = {key.split(".")[0] for key in CODE_KEYS}
    named = re.compile(rf"`((?:{'|'.join(sorted(sections))})\.[a-z_]+)")
    stale = []
    for page in PAGES:
        for m in named.finditer(page.read_text(encoding="utf-8")):
            if m[1] not in CODE_KEYS and m[1] not in NOT_KEYS:
                stale.append(f"{page.relative_to(ROOT)}: {m[1]}")
    assert not stale, f"keys the code does not have: {stale}"


def test_the_readme_job_file_example_is_a_valid_job(tmp_path):
    (block,) = [b for info, b in fenced_blocks(README) if info == "yaml"]
    job = tmp_path / "job.yaml"
    job.write_text(block, encoding="utf-8")
    cfg = load_job(job)
    assert cfg.model.adapter == "davidkim205/komt-Llama-2-7b-chat-hf-lora" and cfg.input.id_column == "id"


# --- (b) the README's two commands and first real run, on the tiny model -----------------------


def fenced_blocks(page: Path) -> list[tuple[str, str]]:
    """(info string, text) of every ``` block of a page."""
    return re.findall(r"^```([^\n]*)\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.M | re.S)


def readme_block(marker: str) -> str:
    blocks = [text for info, text in fenced_blocks(README) if info.split()[1:] == [marker]]
    assert blocks, f"README.md has no ```bash {marker} block"
    return "".join(blocks)


# Commands of those sections that cannot run here, each with the reason. A command the README gains
# that needs the network, a GPU or a cluster fails the test until it is named here.
NOT_RUN = {
    "make test": "the test suite itself: not re-run inside it (test_make_test_runs_pytest checks what it runs)",
    "pip install torch": "GPU node only: the CUDA build of torch, from the network; the tests run in the environment `make test` installed",
    "pip install -e .": "network: installs the package and its dependencies; the tests run in the environment `make test` installed",
    "hf download": "network and a GPU node's disk: the 7B weights (about 13 GB); the tests use the tiny model instead",
    "slurm/submit.sh": "needs a SLURM cluster and GPUs: tests/test_slurm_jobs.py submits the real CLI to a test cluster",
}

# The real job's commands run on the tiny model: these overrides are added to every `komt-batch`
# command that names jobs/komt.yaml.
TINY = [
    "model.base=models/tiny-komt/base",
    "model.adapter=models/tiny-komt/adapter",
    "model.device_map=cpu",
    "model.compute_dtype=float32",
    "generation.max_new_tokens=24",
]


def runnable(block: str) -> tuple[str, list[str]]:
    """The block as a script, with each command of NOT_RUN replaced by a no-op; and those skipped."""
    lines, skipped = [], []
    for line in block.splitlines():
        hit = [c for c in NOT_RUN if line.startswith(c)]
        if hit:
            skipped.append(hit[0])
            line = f": skipped {hit[0]!r}"
        lines.append(line)
    return "\n".join(lines) + "\n", skipped


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of what the commands read (Makefile, jobs, data, the tiny model), with `komt-batch` on
    PATH and in .venv running this checkout's code, as `make setup` would leave it."""
    work = tmp_path / "komt-batch"
    work.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(ROOT / name, work / name)
    for name in ("jobs", "data", "models/tiny-komt", "slurm"):
        shutil.copytree(ROOT / name, work / name)
    shim = f'#!/bin/sh\ncase " $* " in *" jobs/komt.yaml "*) set -- "$@" {" ".join(TINY)};; esac\nexec "{sys.executable}" -m batch "$@"\n'
    for bin_dir in (tmp_path / "bin", work / ".venv" / "bin"):
        bin_dir.mkdir(parents=True)
        (bin_dir / "komt-batch").write_text(shim)
        (bin_dir / "komt-batch").chmod(0o755)
    stamp = work / ".venv" / ".installed"  # `make setup` done: newer than pyproject.toml
    stamp.touch()
    later = time.time() + 60
    os.utime(stamp, (later, later))
    return work


def run_script(script: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{cwd.parent / 'bin'}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MAKEFLAGS", None)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the README's commands failed:\n{script}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc


def test_the_two_commands(checkout):
    script, skipped = runnable(readme_block("two-commands"))
    assert skipped == ["make test"]
    run_script(script, checkout)
    demo = pq.read_table(checkout / "out" / "demo.parquet")
    prompts = (checkout / "data" / "demo_prompts.jsonl").read_text(encoding="utf-8").splitlines()
    assert demo.num_rows == len(prompts) == 14
    assert all(demo.column("response").to_pylist())


def test_make_test_runs_pytest(checkout):
    shown = subprocess.run(["make", "-n", "test"], cwd=checkout, capture_output=True, text=True, check=True).stdout
    assert re.search(r"^\.venv/bin/python -m pytest$", shown, re.M), shown


def test_the_first_real_run(checkout):
    script, skipped = runnable(readme_block("first-run"))
    assert sorted(skipped) == sorted(["pip install torch", "pip install -e .", "hf download", "hf download", "slurm/submit.sh"])
    (checkout / "data" / "prompts.jsonl").unlink(missing_ok=True)
    proc = run_script(script, checkout)
    prompts = [yaml.safe_load(line) for line in (checkout / "data" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    out = pq.read_table(checkout / "out" / "annotated.parquet")
    assert out.column("id").to_pylist() == [p["id"] for p in prompts]
    assert out.column("instruction").to_pylist() == [p["instruction"] for p in prompts]
    assert set(out.column("finish_reason").to_pylist()) <= {"stop", "eos", "length"}
    states = re.findall(r"^state\s+(\w+)$", proc.stdout, re.M)
    assert states[0] == "valid" and states[-1] == "done", proc.stdout  # validate before the run, status after it


# --- (c) links between pages and to the repository's files --------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        s = slug(heading)
        found.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


REPO_PATH = re.compile(r"`((?:batch|tools|tests|jobs|slurm|models|docs|\.ci)/[\w./*-]*)(?:::(\w+))?")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_files_named_in_the_pages_exist(page):
    missing = []
    for m in REPO_PATH.finditer(page.read_text(encoding="utf-8")):
        path, test_name = m[1].rstrip("."), m[2]
        hits = list(ROOT.glob(path)) if "*" in path else [ROOT / path] if (ROOT / path).exists() else []
        if not hits:
            missing.append(path)
        elif test_name and f"def {test_name}(" not in hits[0].read_text(encoding="utf-8"):
            missing.append(f"{path}::{test_name}")
    assert not missing, f"{page.relative_to(ROOT)} names files or tests that do not exist: {missing}"


# --- no absolute path of a particular machine in the repository's text ---------------------------

# Absolute paths under a machine's own folders (a user's home, an install prefix, a cluster's or a
# workplace's mounts). System paths every Linux has (/proc, /dev, /tmp, /usr/bin, /etc/munge) are fine.
MACHINE_PATH = re.compile(r"(?<![\w.~$}\-/])/(?:opt|home|root|work|Users|mnt|srv|scratch|nfs|lustre|gpfs|data|shared)/")
# (file, text) that is not a machine's path: a made-up home directory a test sets HOME to (written
# in two pieces here, so that this line is no hit itself).
ALLOWED = {(f, "/home" + "/me") for f in ("tests/test_config.py", "tests/test_overrides_as_written.py")}


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): every file
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    files = []
    for name in filter(None, names):
        path = ROOT / name
        if path.is_file() and path.suffix not in (".safetensors", ".parquet", ".whl"):
            files.append(path)
    return files


def test_no_absolute_path_of_a_particular_machine():
    found = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        name = str(path.relative_to(ROOT))
        for number, line in enumerate(text.splitlines(), 1):
            for m in MACHINE_PATH.finditer(line):
                if not any(name == f and line[m.start():].startswith(t) for f, t in ALLOWED):
                    found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, "paths of a particular machine (make them a setting, or relative to the repository):\n" + "\n".join(found)
