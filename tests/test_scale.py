"""Memory stays bounded at scale: `validate` (read, render, tokenize, plan) on 100,000 prompts of
about 300 characters, JSONL and Parquet, in a real process; the growth from 10,000 to 100,000 rows,
extrapolated to 1,000,000, must stay under 2 GB of resident memory."""

import random
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, cli_env, make_job

MEASURE = (
    "import resource, sys\n"
    "from batch.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(code)\n"
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


def validate_rss_mb(tmp_path, input_path) -> tuple[float, float]:
    job = make_job(tmp_path, input_path, f"job-{input_path.name}.yaml", generation={"max_new_tokens": 128})
    start = time.time()
    p = subprocess.run([sys.executable, "-c", MEASURE, "validate", str(job)], cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rss = next(int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("MAXRSS_KB"))
    return rss / 1024, time.time() - start


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    big = prompts_table(100_000)
    pq.write_table(big, d / "100k.parquet")
    for name, table in (("10k.jsonl", big.slice(0, 10_000)), ("100k.jsonl", big)):
        with open(d / name, "w", encoding="utf-8") as fh:
            import json

            for row in table.to_pylist():
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return d


def test_validate_memory_grows_slowly_enough_for_a_million_rows(inputs, tmp_path):
    small, _ = validate_rss_mb(tmp_path, inputs / "10k.jsonl")
    large, seconds = validate_rss_mb(tmp_path, inputs / "100k.jsonl")
    per_row_kb = (large - small) * 1024 / 90_000
    projected_1m = large + (large - small) * 10
    print(f"validate RSS: 10k rows {small:.0f} MB, 100k rows {large:.0f} MB ({per_row_kb:.2f} KB/row), 1M projected {projected_1m:.0f} MB, 100k in {seconds:.1f}s")
    assert projected_1m < 2048
    assert seconds < 60  # a million rows: a few minutes


def test_validate_parquet_100k(inputs, tmp_path):
    rss, seconds = validate_rss_mb(tmp_path, inputs / "100k.parquet")
    print(f"validate RSS on 100k Parquet rows: {rss:.0f} MB in {seconds:.1f}s")
    assert rss < 1024 and seconds < 60
