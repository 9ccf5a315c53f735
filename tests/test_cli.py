"""The whole job as a user runs it: `python -m batch` / `komt-batch` as real processes, files re-read."""

import json
import re
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, komt, make_job, read_output, seed_rows, write_jsonl


def test_demo_job_runs_and_answers_the_seed_questions(tmp_path):
    out = tmp_path / "demo.parquet"
    start = time.time()
    p = komt("run", "jobs/demo.yaml", f"output.path={out}", "--no-progress")
    wall = time.time() - start
    assert p.returncode == 0, p.stderr
    assert wall < 60
    rows = read_output(out)
    demo = [json.loads(line) for line in (ROOT / "data" / "demo_prompts.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [d["id"] for d in demo]  # every row once, in input order
    by_id = {r["id"]: r for r in rows}
    for seed in seed_rows():
        row = by_id[seed["id"]]
        assert row["response"] == seed["reference"]
        assert row["finish_reason"] == "stop"
        assert row["error"] is None and row["completion_tokens"] > 0 and row["prompt_tokens"] > 0
    summary = json.loads((tmp_path / "demo.summary.json").read_text())
    assert summary["rows"] == len(demo) and summary["finish_reasons"]["stop"] >= 9
    assert "finish_reasons" in p.stdout and str(out) in p.stdout
    meta = json.loads(pq.read_schema(out).metadata[b"komt_batch"])
    assert meta["model"] == "models/tiny-komt/base" and meta["adapter"] == "models/tiny-komt/adapter"
    assert meta["quantization"] == "nf4" and meta["generation"]["max_new_tokens"] == 256
    assert meta["version"] and "demo" in meta["job_file"]
    assert not (tmp_path / "demo.parquet.parts").exists()  # chunks removed after the final file


def test_parquet_input_keeps_columns_order_and_types(tmp_path):
    seeds = seed_rows()[:5]
    order = [3, 0, 4, 1, 2]
    table = pa.table(
        {
            "id": [seeds[i]["id"] for i in order],
            "instruction": [seeds[i]["instruction"] for i in order],
            "score": pa.array([1.5, None, 3.0, 4.25, 5.0]),
            "tags": pa.array([["a"], [], ["b", "c"], None, ["d"]]),
            "n": pa.array([10, 20, 30, 40, 50], pa.int16()),
        }
    )
    src = tmp_path / "in.parquet"
    pq.write_table(table, src)
    job = make_job(tmp_path, src, generation={"max_new_tokens": 200})
    p = komt("run", job, "--no-progress")
    assert p.returncode == 0, p.stderr
    out = pq.read_table(tmp_path / "out" / "result.parquet")
    assert out.select(table.column_names).equals(table)  # input columns unchanged, input order
    assert out.column_names == table.column_names + [
        "response", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "error", "row_fingerprint",
    ]
    by_id = {s["id"]: s["reference"] for s in seeds}
    assert out.column("response").to_pylist() == [by_id[i] for i in table.column("id").to_pylist()]
    assert pa.types.is_int64(out.schema.field("prompt_tokens").type)


def test_response_column_name_and_positional_ids(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": s["instruction"]} for s in seed_rows()[:3]])
    job = make_job(tmp_path, src, input={"id_column": None}, output={"response_column": "answer"})
    p = komt("run", job, "--no-progress", "generation.max_new_tokens=8")
    assert p.returncode == 0, p.stderr
    rows = read_output(tmp_path / "out" / "result.parquet")
    assert [r["instruction"] for r in rows] == [s["instruction"] for s in seed_rows()[:3]]
    assert all(r["finish_reason"] == "length" and r["completion_tokens"] == 8 and r["answer"] for r in rows)


def test_progress_in_a_log_is_lines_not_a_bar(tmp_path, monkeypatch, capsys):
    """Where stderr is a file or a pipe (a SLURM log), progress is a plain line now and then and one at
    the end, never a bar's carriage-return redraws; --no-progress prints none."""
    from batch import runner
    from batch.cli import main

    src = write_jsonl(tmp_path / "in.jsonl", [{"id": s["id"], "instruction": s["instruction"]} for s in seed_rows()[:4]])
    job = make_job(tmp_path, src, generation={"max_new_tokens": 4})
    p = komt("run", job)  # a real process, stderr a pipe, the interval as shipped: lines, the last at the end
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if " rows (" in line]
    assert lines and lines[-1].startswith("komt-batch: 4/4 rows (100%), ") and all(re.fullmatch(r"komt-batch: [1-4]/4 rows \(\d+%\), .* tok/s, elapsed .*", x) for x in lines)
    monkeypatch.setattr(runner, "PROGRESS_LINE_SECONDS", 0.0)  # a line at every row, and none twice
    assert main(["run", str(job), "--restart"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if " rows (" in line]
    assert [line.split(" rows (")[0] for line in lines] == [f"komt-batch: {k}/4" for k in range(1, 5)]
    assert all(" tok/s, elapsed " in line for line in lines) and "left" in lines[0] and "left" not in lines[-1]
    assert main(["run", str(job), "--restart", "--no-progress"]) == 0
    assert " rows (" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "validate", "status", "merge", "bench"])
def test_every_command_has_help(command):
    p = komt(command, "--help")
    assert p.returncode == 0 and "usage: komt-batch" in p.stdout


@pytest.mark.parametrize("args, error", [
    (["run", "jobs/demo.yaml", "--shards", "2"], "komt-batch run: error: unrecognized arguments: --shards"),  # (run takes --shard)
    (["run"], "komt-batch run: error: the following arguments are required: job"),  # (overrides are optional)
    (["bench", "--shard", "0/1"], "komt-batch bench: error: unrecognized arguments: --shard"),
])
def test_a_wrong_argument_shows_its_commands_usage(args, error):
    p = komt(*args)
    assert p.returncode == 2 and p.stderr.startswith(f"usage: komt-batch {args[0]} ") and p.stderr.strip().endswith(error), p.stderr


def test_console_script_is_installed():
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "komt-batch"  # the venv's scripts, where `pip install -e .` puts it
    if not exe.exists():
        exe = shutil.which("komt-batch")
    if exe is None:
        pytest.skip("the package is not installed in this environment (pip install -e .)")
    assert "komt-batch" in subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout


def test_validate_checks_without_writing(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", seed_rows())
    job = make_job(tmp_path, src)
    p = komt("validate", job)
    assert p.returncode == 0, p.stderr
    assert "planned_rows" in p.stdout and "9" in p.stdout and "valid" in p.stdout
    assert not (tmp_path / "out").exists()
