"""komt-batch run | validate | plan | status | merge | bench.

Errors a user can cause end here as one line and exit code 2 (JobError). A failed write (a full
disk) ends as one line and exit code 74, a signal that stopped a run after checkpointing with exit
code 75, a second Ctrl-C with 130: each says which command resumes the run.

This module's imports are light on purpose: main installs the signal handlers before the heavy
ones (torch, transformers) are imported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import time
from typing import TYPE_CHECKING

from batch import __version__
from batch.errors import JobError, WriteError
from batch.signals import Interrupted, StopFlag

if TYPE_CHECKING:
    from batch.config import JobConfig

OVERRIDES_HELP = "dotted.key=value overrides of the job file, e.g. generation.max_new_tokens=64"
PLACEHOLDER_FLAGS = {"date": "--date", "time": "--time", "job_id": "--run-id"}
RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="komt-batch",
        description="Offline batch generation with a 4-bit NF4 + LoRA causal LM: YAML job in, Parquet out.",
    )
    p.add_argument("--version", action="version", version=f"komt-batch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(command_parser=c)  # (its usage for an unknown option, not the top level's)
        c.add_argument("job", help="the YAML job file")
        # (a default, so that argparse does not list KEY=VALUE among "the following arguments are required")
        c.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=OVERRIDES_HELP)
        c.add_argument("--date", help="the value of {date} in paths (default: today, YYYY-MM-DD)")
        c.add_argument("--time", help="the value of {time} in paths (default: now, HHMMSS)")
        c.add_argument("--run-id", help="the value of {job_id} in paths (default: SLURM_ARRAY_JOB_ID or SLURM_JOB_ID, else 'local')")
        return c

    run = job_command("run", "run a job (resumes from its checkpoint when there is one; a finished output is left alone)")
    run.add_argument("--shard", help="run shard I of N of the plan, as I/N (default: from SLURM's job array, else 0/1)")
    run.add_argument("--restart", action="store_true", help="forget the checkpoint and start over (also regenerates a finished output)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    va = job_command("validate", "check the job file and the input without loading the model")
    va.add_argument("--restart", action="store_true", help="check as run --restart would: the stored checkpoint is not checked")
    pl = job_command("plan", "make and store the job's plan once, without the model's weights (before a SLURM array starts)")
    pl.add_argument("--restart", action="store_true", help="forget the checkpoint and plan again")
    st = job_command("status", "progress of a run: rows and chunks done, tokens/s, ETA, whether the plan still matches")
    st.add_argument("--shards", help="show progress per shard for N shards")
    mg = job_command("merge", "write the final file once every chunk of every shard is done")
    mg.add_argument("--shards", help="the number of shards, to name the missing ones")
    bench = sub.add_parser("bench", help="benchmark: one-at-a-time vs fixed batches vs this job's engine (vs vLLM)")
    bench.set_defaults(command_parser=bench)
    bench.add_argument("job", nargs="?", default=None, help="a bench job file (default: jobs/bench.yaml)")
    bench.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the bench settings")
    return p


def placeholders(args) -> dict[str, str]:
    """The values of {date}, {time} and {job_id}; given ones are checked like any other input."""
    if args.date is not None and not _is_date(args.date):
        raise JobError(f"--date: expected a date as YYYY-MM-DD, e.g. 2026-11-27, got {args.date!r}")
    if args.time is not None and not _is_time(args.time):
        raise JobError(f"--time: expected a time as HHMMSS, e.g. 020000, got {args.time!r}")
    if args.run_id is not None and not RUN_ID.fullmatch(args.run_id):
        raise JobError(f"--run-id: expected letters, digits, '.', '_' or '-' (it goes into paths), got {args.run_id!r}")
    now = time.localtime()
    return {
        "date": args.date or time.strftime("%Y-%m-%d", now),
        "time": args.time or time.strftime("%H%M%S", now),
        "job_id": args.run_id or os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or "local",
    }


def _is_date(text: str) -> bool:
    try:
        return bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", text)) and datetime.date.fromisoformat(text) is not None
    except ValueError:
        return False


def _is_time(text: str) -> bool:
    return bool(re.fullmatch(r"\d{6}", text)) and int(text[:2]) < 24 and int(text[2:4]) < 60 and int(text[4:]) < 60


def shard_count(args) -> int | None:
    if args.shards is None:
        return None
    if not (args.shards.isdigit() and int(args.shards) >= 1):
        raise JobError(f"--shards: expected a number of shards >= 1, got {args.shards!r}")
    return int(args.shards)


def resume_command(args, job: JobConfig, fill: dict[str, str], shard: tuple[int, int] | None = None) -> str:
    """The command that continues this run: the same job, overrides and shard, the values of the
    placeholders its paths use (from the job file or an override; given, defaulted or from SLURM),
    and never --restart."""
    words = ["komt-batch", args.command]
    for key, flag in PLACEHOLDER_FLAGS.items():
        if "{" + key + "}" in job.text or any("{" + key + "}" in o for o in args.overrides):
            words += [flag, fill[key]]
    if shard:
        words += ["--shard", f"{shard[0]}/{shard[1]}"]
    if getattr(args, "shards", None):
        words += ["--shards", args.shards]
    if getattr(args, "no_progress", False):
        words.append("--no-progress")
    return shlex.join([*words, args.job, *args.overrides])


def main(argv: list[str] | None = None) -> int:
    """The CLI. Without argv it is the process's entry point (the console script, python -m batch):
    the signal handlers go in before anything heavy is imported and stay until the process ends, so
    the exit code holds from its first instant to its last. With argv (tests) the handlers that
    were there before are put back on return."""
    stop = StopFlag.install()
    try:
        return _main(argv, stop)
    finally:
        if argv is None:
            stop.ignore()
        else:
            stop.restore()


def _main(argv: list[str] | None, stop: StopFlag) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`run job.yaml --restart key=value`)
    stray = [a for a in extra if a.startswith("-")]
    if stray:
        args.command_parser.error(f"unrecognized arguments: {' '.join(stray)}")  # (a command is required: argparse)
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.resume = None  # the command that resumes, once the job is known
    try:
        if args.command not in ("run", "merge"):  # they only read: a signal acts as it always does
            stop.check("at start-up")
            stop.restore()
        return dispatch(args, stop)
    except Interrupted as e:
        print(f"komt-batch: {e}.{_resume_hint(args)}", file=sys.stderr)
        return e.exit_code
    except WriteError as e:
        print(f"komt-batch: error: {e}. Rows committed before it are kept; free space.{_resume_hint(args)}", file=sys.stderr)
        return e.exit_code
    except JobError as e:
        from batch.config import blame_overrides

        print(f"komt-batch: error: {blame_overrides(str(e), args.overrides)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"komt-batch: interrupted; rows since the last checkpoint will be redone on resume.{_resume_hint(args)}", file=sys.stderr)
        return 130


def _resume_hint(args) -> str:
    return f" To resume, run: {args.resume}" if args.resume else ""


def dispatch(args, stop: StopFlag) -> int:
    if args.command == "bench":
        from batch.bench import main as bench_main

        return bench_main(args.job, args.overrides)
    from batch.config import load_job

    fill = placeholders(args)
    shards = shard_count(args) if args.command in ("status", "merge") else None
    job = load_job(args.job, args.overrides, fill)
    if args.command == "run":
        from batch.shards import parse_shard, slurm_shard

        shard, count = parse_shard(args.shard) if args.shard else slurm_shard()
        args.resume = resume_command(args, job, fill, (shard, count) if count > 1 else None)
        stop.check("before any work; nothing was written")
        from batch import threads

        threads.before_torch(job.cpu)  # OpenMP reads its wait policy when torch loads it
        # torch and transformers: seconds to import; a signal meanwhile is recorded, and run stops at once
        from batch import runner

        print_summary(runner.run(job, shard, count, stop, restart=args.restart, progress=not args.no_progress))
        return 0
    if args.command in ("validate", "plan"):
        from batch import runner

        print_summary(runner.validate(job, restart=args.restart) if args.command == "validate" else runner.plan(job, restart=args.restart))
        return 0
    from batch import status

    if args.command == "status":
        print_summary(status.status(job, shards))
    else:
        args.resume = resume_command(args, job, fill)
        print_summary(status.merge(job, shards, stop))
    return 0


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        print(f"{key:<{width}}  {value}")
