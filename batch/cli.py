"""komt-batch run | validate | status | merge | bench.

Errors a user can cause end here as one line and exit code 2 (JobError); a signal that stopped a
run after checkpointing ends with exit code 75 (run the same command again to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from batch import __version__
from batch.config import JobConfig, load_job
from batch.errors import EXIT_INTERRUPTED, JobError

OVERRIDES_HELP = "dotted.key=value overrides of the job file, e.g. generation.max_new_tokens=64"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="komt-batch",
        description="Offline batch generation with a 4-bit NF4 + LoRA causal LM: YAML job in, Parquet out.",
    )
    p.add_argument("--version", action="version", version=f"komt-batch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("job", help="the YAML job file")
        c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
        c.add_argument("--date", help="the value of {date} in paths (default: today, YYYY-MM-DD)")
        c.add_argument("--time", help="the value of {time} in paths (default: now, HHMMSS)")
        c.add_argument("--run-id", help="the value of {job_id} in paths (default: SLURM_ARRAY_JOB_ID or SLURM_JOB_ID, else 'local')")
        return c

    run = job_command("run", "run a job (resumes from its checkpoint when there is one)")
    run.add_argument("--shard", help="run shard I of N of the plan, as I/N (default: from SLURM's job array, else 0/1)")
    run.add_argument("--restart", action="store_true", help="forget the checkpoint and start over")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    job_command("validate", "check the job file and the input without loading the model")
    st = job_command("status", "progress of a run: rows and chunks done, tokens/s, ETA, whether the plan still matches")
    st.add_argument("--shards", type=int, help="show progress per shard for N shards")
    mg = job_command("merge", "write the final file once every chunk of every shard is done")
    mg.add_argument("--shards", type=int, help="the number of shards, to name the missing ones")
    bench = sub.add_parser("bench", help="benchmark: one-at-a-time vs fixed batches vs this job's engine (vs vLLM)")
    bench.add_argument("job", nargs="?", default=None, help="a bench job file (default: jobs/bench.yaml)")
    bench.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the bench settings")
    return p


def placeholders(args) -> dict[str, str]:
    now = time.localtime()
    return {
        "date": args.date or time.strftime("%Y-%m-%d", now),
        "time": args.time or time.strftime("%H%M%S", now),
        "job_id": args.run_id or os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or "local",
    }


def resume_hint(args, job: JobConfig, fill: dict[str, str]) -> str:
    used = [k for k in ("date", "time", "job_id") if "{" + k + "}" in job.text]
    flags = {"date": "--date", "time": "--time", "job_id": "--run-id"}
    extra = " ".join(f"{flags[k]} {fill[k]}" for k in used)
    return f" (with {extra})" if extra else ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`run job.yaml --restart key=value`)
    stray = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return dispatch(args)
    except JobError as e:
        print(f"komt-batch: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("komt-batch: interrupted; rows since the last checkpoint will be redone on resume", file=sys.stderr)
        return 130
    except Exception as e:  # the runner's Interrupted carries its exit code
        code = getattr(e, "exit_code", None)
        if code == EXIT_INTERRUPTED:
            print(str(e), file=sys.stderr)
            return code
        raise


def dispatch(args) -> int:
    if args.command == "bench":
        from batch.bench import main as bench_main

        return bench_main(args.job, args.overrides)
    fill = placeholders(args)
    job = load_job(args.job, args.overrides, fill)
    from batch import runner, status

    if args.command == "run":
        from batch.shards import parse_shard, slurm_shard

        shard, shards = parse_shard(args.shard) if args.shard else slurm_shard()
        summary = runner.run(job, shard, shards, restart=args.restart, progress=not args.no_progress, resume_hint=resume_hint(args, job, fill))
        print_summary(summary)
    elif args.command == "validate":
        print_summary(runner.validate(job))
    elif args.command == "status":
        print_summary(status.status(job, args.shards))
    elif args.command == "merge":
        print_summary(status.merge(job, args.shards))
    return 0


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        print(f"{key:<{width}}  {value}")
