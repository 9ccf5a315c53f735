"""Memory stays bounded at scale: `validate` (read, render, tokenize, plan) on 100,000 prompts of
about 300 characters, JSONL and Parquet, in a real process; the growth from 10,000 to 100,000 rows,
extrapolated to 10,000,000, must stay under 2 GB of resident memory. Reading the input the way
planning and the input fingerprint do (convert or map, every slice's prompts, every id), from JSONL,
Parquet and a save_to_disk folder, must too; and so must `merge` writing the final file from a
checkpoint of 40,000 and 160,000 finished rows (with responses of about 300 characters)."""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, cli_env, make_job

# The peak resident memory of the process image (VmHWM): ru_maxrss would also count the pytest
# process it was forked from (Linux keeps the high-water mark across exec).
PEAK = "print('MAXRSS_KB', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
MEASURE = (
    "import sys\n"
    "from batch.cli import main\n"
    "code = main(sys.argv[1:])\n"
    + PEAK
    + "sys.exit(code)\n"
)
WORDS = "자동차 검사 의무기간 누전차단기 이유 협력공인중개사 원산지표시 the quick brown fox 공기압 관리 행정심판 질문".split()


def prompts_table(n: int) -> pa.Table:
    rng = random.Random(n)
    texts = []
    for _ in range(n):
        words = []
        while sum(len(w) + 1 for w in words) < 300:
            words.append(rng.choice(WORDS))
        texts.append(" ".join(words)[:300])
    return pa.table({"id": [f"row-{i:07d}" for i in range(n)], "instruction": texts})


# What planning and the input fingerprint do with the input, without the tokenizer and the plan.
READ = (
    "import sys\n"
    "from batch.config import load_job\n"
    "from batch.fingerprints import input_fingerprint\n"
    "from batch.rows import read_rows\n"
    "rows = read_rows(load_job(sys.argv[1]))\n"
    "assert input_fingerprint(rows)['rows'] == len(rows.ids)\n"
    + PEAK
)


def validate_rss_mb(tmp_path, input_path, script: str = MEASURE, args: tuple[str, ...] = ("validate",)) -> tuple[float, float]:
    job = make_job(tmp_path, input_path, f"job-{input_path.name}.yaml", generation={"max_new_tokens": 128})
    env = {**cli_env(), "XDG_CACHE_HOME": str(tmp_path / f"cache-{input_path.name}")}  # the first read converts
    start = time.time()
    p = subprocess.run([sys.executable, "-c", script, *args, str(job)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rss = next(int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("MAXRSS_KB"))
    return rss / 1024, time.time() - start


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    big = prompts_table(100_000)
    pq.write_table(big, d / "100k.parquet")
    # Reading grows by a few MB until its buffers and allocators are warm (about 50,000 rows), then
    # stays: growth is measured from 40,000 to 160,000 rows (100,000 prompts, some twice).
    texts = big.column("instruction").combine_chunks()
    reading = pa.table({"id": [f"row-{i:07d}" for i in range(160_000)], "instruction": pa.concat_arrays([texts, texts.slice(0, 60_000)])})
    for name, table in (("10k", big.slice(0, 10_000)), ("100k", big), ("40k", reading.slice(0, 40_000)), ("160k", reading)):
        if name in ("40k", "160k"):
            # pyarrow decodes a Parquet row group's column whole: memory is bounded by a row group, not by the
            # file (pyarrow writes at most 1,048,576 rows per group), so growth is measured with small ones
            pq.write_table(table, d / f"{name}.parquet", row_group_size=10_000)
            datasets.Dataset(table).save_to_disk(str(d / f"{name}-saved"))
        with open(d / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in table.to_pylist():
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return d


@pytest.fixture(scope="module")
def validate_jsonl(inputs, tmp_path_factory):
    """validate's peak memory on 10,000 and 100,000 JSONL rows, and its time on 100,000."""
    tmp_path = tmp_path_factory.mktemp("validate")
    small, _ = validate_rss_mb(tmp_path, inputs / "10k.jsonl")
    large, seconds = validate_rss_mb(tmp_path, inputs / "100k.jsonl")
    return small, large, seconds


def test_validate_memory_grows_slowly_enough_for_a_million_rows(validate_jsonl):
    small, large, seconds = validate_jsonl
    per_row_kb = (large - small) * 1024 / 90_000
    projected_1m = large + (large - small) * 10
    print(f"validate RSS: 10k rows {small:.0f} MB, 100k rows {large:.0f} MB ({per_row_kb:.2f} KB/row), 1M projected {projected_1m:.0f} MB, 100k in {seconds:.1f}s")
    assert projected_1m < 2048
    assert seconds < 60  # a million rows: a few minutes


def test_validate_parquet_100k(inputs, tmp_path):
    rss, seconds = validate_rss_mb(tmp_path, inputs / "100k.parquet")
    print(f"validate RSS on 100k Parquet rows: {rss:.0f} MB in {seconds:.1f}s")
    assert rss < 1024 and seconds < 60


@pytest.mark.parametrize("source", [".jsonl", ".parquet", "-saved"])
def test_reading_memory_grows_slowly_enough_for_ten_million_rows(inputs, tmp_path, source):
    small, _ = validate_rss_mb(tmp_path, inputs / f"40k{source}", READ, ())
    large, seconds = validate_rss_mb(tmp_path, inputs / f"160k{source}", READ, ())
    projected_10m = large + (large - small) * (10_000_000 - 160_000) / 120_000
    print(f"reading {source}: 40k rows {small:.0f} MB, 160k rows {large:.0f} MB, 10M projected {projected_10m:.0f} MB, 160k in {seconds:.1f}s")
    assert projected_10m < 2048
    assert seconds < 60


# A finished checkpoint without a model: the stored plan's rows, each with a response of about 100
# characters, committed in parts of 4,096 rows in plan order (as a run commits them).
FINISH = """
import sys
import pyarrow as pa
from batch.checkpoint import Checkpoint
from batch.config import load_job
from batch.results import RESULT_SCHEMA
job = load_job(sys.argv[1])
ckpt = Checkpoint(job.parts_dir)
plan = ckpt.load_plan()
for start in range(0, plan.rows.num_rows, 4096):
    t = plan.rows.slice(start, 4096)
    n = t.num_rows
    part = pa.table({
        "row": t.column("row"), "batch": t.column("batch"),
        "response": pa.array([f"답변 {r} " + "생성된 응답 문장 " * 10 for r in t.column("row").to_pylist()]),
        "finish_reason": pa.array(["stop"] * n), "stop_reason": pa.array(["###"] * n), "prompt_tokens": t.column("prompt_tokens").cast(pa.int64()),
        "completion_tokens": pa.array([120] * n, pa.int64()), "error": pa.nulls(n, pa.string()),
        "row_fingerprint": t.column("row_fingerprint"),
    }, schema=RESULT_SCHEMA)
    ckpt.write_part(plan, 0, 1, part, {"rows": n})
"""
# `komt-batch plan` with prompt lengths counted as characters / 3 instead of tokenized: the same
# plan files, in seconds (this test measures merge, not the tokenizer).
PLAN = (
    "import sys\n"
    "from batch import planning\n"
    "planning.prompt_lengths = lambda tokenizer, prompts: [len(p) // 3 for p in prompts]\n"
    "from batch.cli import main\n"
    "code = main(['plan', sys.argv[1]])\n"
)
# merge with sort runs and row groups of 4 MB instead of 64 MB: growth between the sizes is then per
# row, not the buffers filling up; the projection adds what the default buffers hold at most.
SMALL_BUFFERS = 4 << 20
MERGE = (
    "import sys\n"
    "from batch import row_order, writer\n"
    f"row_order.RUN_BYTES = writer.GROUP_BYTES = {SMALL_BUFFERS}\n"
    "from batch.cli import main\n"
    "code = main(sys.argv[1:])\n"
    + PEAK
    + "sys.exit(code)\n"
)
# batches and commits as a large job has them (the defaults of batching and checkpoint.every_rows;
# make_job's tiny batches would give a chunk to every 4 rows)
AT_SCALE = dict(batching={"max_batch_size": 32, "max_batch_tokens": 32768}, checkpoint={"every_rows": 256})


def fast_prompts(n: int, path) -> None:
    """n rows of ids and 300-character prompts of WORDS, as Parquet in 10,000-row groups (numpy: seconds)."""
    rng = np.random.default_rng(n)
    words = np.array(WORDS, dtype=object)
    with pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("instruction", pa.string())])) as w:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            texts = [" ".join(row)[:300] for row in words[rng.integers(0, len(words), size=(m, 80))]]
            w.write_table(pa.table({"id": [f"row-{i:07d}" for i in range(start, start + m)], "instruction": texts}))


def plan_rss_mb(tmp_path, rows: int) -> tuple[float, float, Path]:
    """`komt-batch plan` (read, render, fingerprint, plan, store) of `rows` prompts, tokenizing aside."""
    src = tmp_path / f"{rows}.parquet"
    fast_prompts(rows, src)
    out = tmp_path / f"out-{rows}.parquet"
    job = make_job(tmp_path, src, f"merge-{rows}.yaml", generation={"max_new_tokens": 128}, output={"path": str(out)}, **AT_SCALE)
    env = {**cli_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    start = time.time()
    p = subprocess.run([sys.executable, "-c", PLAN + PEAK, str(job)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rss = next(int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("MAXRSS_KB"))
    return rss / 1024, time.time() - start, job


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Plans of 100,000 and 500,000 prompts: (peak MB, seconds, job) each."""
    tmp_path = tmp_path_factory.mktemp("planned")
    return [plan_rss_mb(tmp_path, n) for n in (100_000, 500_000)]


def test_planning_memory_grows_slowly_enough_for_ten_million_rows(planned):
    (small, _, _), (large, seconds, _) = planned
    projected_10m = large + (large - small) * (10_000_000 - 500_000) / 400_000
    print(f"plan: 100k rows {small:.0f} MB, 500k rows {large:.0f} MB, 10M projected {projected_10m:.0f} MB, 500k in {seconds:.1f}s (tokenizing aside)")
    assert projected_10m < 2048


def merge_rss_mb(job: Path, rows: int) -> tuple[float, float]:
    env = {**cli_env(), "XDG_CACHE_HOME": str(job.parent / "cache")}
    p = subprocess.run([sys.executable, "-c", FINISH, str(job)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = job.parent / f"out-{rows}.parquet"
    start = time.time()
    p = subprocess.run([sys.executable, "-c", MERGE, "merge", str(job)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    seconds = time.time() - start
    written = pq.read_table(out, columns=["id", "finish_reason"])
    assert written.column("id").to_pylist() == [f"row-{i:07d}" for i in range(rows)]  # every row once, in order
    assert written.column("finish_reason").unique().to_pylist() == ["stop"]
    rss = next(int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("MAXRSS_KB"))
    return rss / 1024, seconds


def test_merge_memory_grows_slowly_enough_for_ten_million_rows(planned):
    """The final file's writing included: 100,000 and 500,000 finished rows (sizes far enough apart
    that the allocator's noise of a few MB does not dominate the growth)."""
    from batch import row_order, writer

    small, _ = merge_rss_mb(planned[0][2], 100_000)
    large, seconds = merge_rss_mb(planned[1][2], 500_000)
    # the default buffers (a sort run and a row group, each held up to three times while sorted or written)
    buffers = 3 * (row_order.RUN_BYTES + writer.GROUP_BYTES - 2 * SMALL_BUFFERS) / 2**20
    projected_10m = large + (large - small) * (10_000_000 - 500_000) / 400_000 + buffers
    print(f"merge: 100k rows {small:.0f} MB, 500k rows {large:.0f} MB, 10M projected {projected_10m:.0f} MB (+{buffers:.0f} MB default buffers), 500k in {seconds:.1f}s")
    assert projected_10m < 2048
    assert seconds < 120
