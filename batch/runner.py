"""The job, top to bottom: read the input -> plan once -> generate this shard's rows -> commit
parts as rows finish -> the final file. `validate` runs the same steps up to the plan, without the model.

One row's way: rows (readers + template) -> planning (plan) -> engine -> checkpoint parts -> writer.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from batch import threads
from batch.checkpoint import PROGRESS_COLUMNS, Busy, Checkpoint, StoredPlan
from batch.config import JobConfig
from batch.engine import Engine, Request, SafeGenerator, row_seed
from batch.errors import JobError
from batch.fingerprints import input_fingerprint, settings_fingerprint
from batch.finished import already_done, output_state, refuse_to_replace
from batch.loading import load_tokenizer
from batch.paths import check_output_name, check_output_writable
from batch.plan import assign_shards
from batch.planning import check_unchanged, make_plan, open_plan
from batch.results import Completion, count_results, results_table
from batch.rows import Rows, read_rows
from batch.signals import StopFlag
from batch.writer import finish_job, finish_leftovers, leftovers, remove_stale_temporaries, write_summary

NOTHING_DONE = "before any work; nothing was written"


@dataclass
class Opened:
    """A job whose input and paths passed every check; nothing written yet."""

    job: JobConfig
    ckpt: Checkpoint
    rows: Rows
    tokenizer: object
    context: int
    input_fp: dict
    settings_fp: dict
    state: str  # what is at output.path (finished.output_state)
    changes: list[str]
    planned_here: bool = False  # open_plan stored a plan that this process made (none was there)

    @classmethod
    def check(cls, job: JobConfig) -> Opened:
        check_output_writable(job)
        ckpt = Checkpoint.of(job)
        if not ckpt.manifest_path.exists() and not Path(job.output.path).exists():
            check_output_name(job)
        rows = read_rows(job)
        ckpt.check_place(job, rows.files)
        tokenizer, context = load_tokenizer(job.model, job.source)
        job.generation.check_tokens(job.source, len(tokenizer))
        input_fp, settings_fp = input_fingerprint(rows), settings_fingerprint(job)
        return cls(job, ckpt, rows, tokenizer, context, input_fp, settings_fp, *output_state(job, input_fp, settings_fp))

    def make_plan(self):
        return make_plan(self.job, self.rows, self.tokenizer, self.context, self.settings_fp)

    def open_plan(self, fresh=None) -> StoredPlan:
        """The stored plan, or `fresh` (made before anything was written) stored, or one made now:
        the shards of an array plan here, under the plan lock, one of them; the others wait."""

        def make():
            self.planned_here = True
            if fresh:
                return fresh
            print(f"komt-batch: planning {self.rows.table.num_rows} rows (no plan stored yet; other shards wait for it)", file=sys.stderr, flush=True)
            return self.make_plan()

        return open_plan(self.job, self.ckpt, make, self.input_fp, self.settings_fp)

    def refuse_to_replace(self, resuming: bool, restart: bool) -> None:
        """A file at output.path is replaced only by a run of this job that started with it there
        (--restart, or a checkpoint made then), and never when komt-batch did not write it."""
        if self.state == "foreign" or (self.state == "changed" and not resuming and not restart):
            raise refuse_to_replace(self.job, self.state, self.changes)


def run(job: JobConfig, shard: int, shards: int, stop: StopFlag, restart: bool = False, progress: bool = True) -> dict:
    """Generate this shard's rows; when unsharded, also write the final file. Returns the summary.

    Every check that can fail on the user's input or paths runs before anything is written. A
    finished output that this job wrote from the same input and settings is left alone."""
    started = time.time()
    stop.check(NOTHING_DONE)
    opened = Opened.check(job)
    ckpt, rows = opened.ckpt, opened.rows
    if opened.state == "done" and not restart:
        if shards == 1 and leftovers(job, ckpt):  # stopped after its final file: finish that
            with contextlib.suppress(Busy), ckpt.output_lock():  # (busy: the run holding it finishes it)
                if output_state(job, opened.input_fp, opened.settings_fp)[0] == "done":
                    finish_leftovers(job, ckpt)
        stop.finished()
        return already_done(job, rows.table.num_rows)
    resuming = ckpt.manifest_path.exists() and not restart
    # Unsharded (or restarting), plan before anything is written, so that a plan that fails
    # changes nothing. Shards of an array plan under the plan lock: one plans, the others wait for it.
    fresh = opened.make_plan() if not resuming and (shards == 1 or restart) else None
    opened.refuse_to_replace(resuming, restart)
    stop.check(NOTHING_DONE)
    stop.start_work()
    with ckpt.job_lock(shard, shards, restart):
        if not restart and output_state(job, opened.input_fp, opened.settings_fp)[0] == "done":  # finished by another process meanwhile
            if shards == 1:
                finish_leftovers(job, ckpt)
            stop.finished()
            return already_done(job, rows.table.num_rows)
        if shards == 1:
            remove_stale_temporaries(job, ckpt)
        plan = opened.open_plan(fresh)
        fresh = None  # (the plan holds what it needs)
        done, _ = ckpt.done_rows(plan)
        owner = np.array(assign_shards(plan.chunks, shards), np.int32)
        plan_rows = plan.rows.column("row").to_numpy()
        mine = np.flatnonzero(owner[plan.rows.column("chunk").to_numpy()] == shard)  # positions in the plan, in plan order
        todo = mine[~done.mask(plan_rows[mine])]
        stats = Stats(resumed_rows=len(mine) - len(todo))
        if len(todo) and stop.received is None:
            watch = threads.Watch.start(threads.apply(job.cpu))  # (None: the threads stay as chosen)
            stop.start_work("the model is loading: the run stops once it is loaded, before any row")
            try:
                engine = Engine.load(job.model, job.generation, job.source, opened.tokenizer, share_prefix=job.batching.share_prefix)
            except JobError:
                # the plan this run stored (under the job lock, unsharded: no other process uses it), no row
                # done yet: the job, mended, starts as new. (Not after --restart: its checkpoint is what lets
                # the next run replace an output of other settings.)
                if opened.planned_here and shards == 1 and not restart and not len(done):
                    with contextlib.suppress(OSError):
                        ckpt.remove()
                raise
            stop.check(f"while the model loaded, before any row was generated ({stats.resumed_rows} rows done before)")
            stop.start_work()
            if engine.device.type != "cpu":
                watch = None  # a GPU's steps do not wait on the CPU's threads
            engine.between_steps = watch
            batches = len(np.unique(plan.rows.column("batch").to_numpy()[todo]))
            print(
                f"komt-batch: generating {len(todo)} rows in {batches} batches"
                f" (shard {shard}/{shards}; {stats.resumed_rows} rows already done)",
                file=sys.stderr,
                flush=True,
            )
            for path, committed in generate_rows(job, rows, plan, ckpt, engine, todo, stop, stats, progress, shard, shards):
                done.add(path, committed)
            stats.cpu_threads_lowered = watch.lowered if watch else 0
        stop.check(f"after committing every finished row ({stats.generated_rows} generated this run)")
        summary = stats.summary(job, plan, started)
        if shards == 1:
            summary = finish_job(job, rows, ckpt, done, plan, stop, summary)
        else:
            summary.update(shard=f"{shard}/{shards}")
            write_summary(ckpt.dir / f"summary-shard-{shard}-of-{shards}.json", summary, ckpt.token)
            stop.finished()
        return summary


@dataclass
class Stats:
    resumed_rows: int = 0
    generated_rows: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    shared_prompt_tokens: int = 0  # prompt tokens whose keys and values came from a shared prefix (batch.prefix)
    prefilled_prompt_tokens: int = 0  # prompt tokens computed (suffixes, and each shared prefix once)
    generate_seconds: float = 0.0
    oom_splits: int = 0
    lowered_budget: int | None = None
    cpu_threads_lowered: int = 0  # times other processes' use of the CPUs lowered the threads (batch.threads.Watch)

    def summary(self, job: JobConfig, plan: StoredPlan, started: float) -> dict:
        wall = time.time() - started
        return {
            "job": job.source,
            "planned_rows": plan.manifest["planned_rows"],
            "reused_rows": plan.manifest["reused_rows"],
            "resumed_rows": self.resumed_rows,
            "generated_rows": self.generated_rows,
            "prompt_tokens": self.prompt_tokens,
            "shared_prompt_tokens": self.shared_prompt_tokens,
            "prefilled_prompt_tokens": self.prefilled_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "generate_seconds": round(self.generate_seconds, 3),
            "tokens_per_second": round(self.completion_tokens / self.generate_seconds, 1) if self.generate_seconds else 0.0,
            "wall_seconds": round(wall, 3),
            "oom_splits": self.oom_splits,
            "lowered_max_batch_tokens": self.lowered_budget,
            "cpu_threads_lowered": self.cpu_threads_lowered,
        }


PROGRESS_LINE_SECONDS = 60.0  # where stderr is not a terminal: a progress line at most this often


class Progress:
    """Rows done, tok/s and the time left: a bar on a terminal; where stderr is a file or a pipe (a
    SLURM log), a line at most every PROGRESS_LINE_SECONDS and one at the end, not a bar's redraws."""

    def __init__(self, total: int, shown: bool):
        self.total, self.done, self.tokens_per_second = total, 0, 0.0
        self.bar = tqdm(total=total, unit="row", mininterval=1.0, dynamic_ncols=True) if shown and sys.stderr.isatty() else None
        self.lines = shown and self.bar is None
        self.started = self.last_line = time.perf_counter()
        self.said = 0  # the rows done at the last line

    def update(self, tokens_per_second: float) -> None:
        self.done += 1
        self.tokens_per_second = tokens_per_second
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{tokens_per_second:.1f} tok/s", refresh=False)
        elif self.lines and time.perf_counter() - self.last_line >= PROGRESS_LINE_SECONDS:
            self.line()

    def line(self) -> None:
        now = time.perf_counter()
        self.last_line, self.said = now, self.done
        left = (self.total - self.done) * (now - self.started) / self.done if self.done else None
        print(
            f"komt-batch: {self.done}/{self.total} rows ({100 * self.done / max(self.total, 1):.0f}%), "
            f"{self.tokens_per_second:.1f} tok/s, elapsed {tqdm.format_interval(now - self.started)}"
            + (f", about {tqdm.format_interval(left)} left" if left is not None and self.done < self.total else ""),
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines and self.done > self.said:
            self.line()


def generate_rows(job, rows: Rows, plan: StoredPlan, ckpt: Checkpoint, engine: Engine, todo: np.ndarray, stop: StopFlag, stats: Stats, progress: bool, shard: int, shards: int) -> Iterator[tuple[Path, np.ndarray]]:
    """The hot loop: stream the rows at plan positions `todo` through the engine in plan order
    (finished rows' places are refilled from the next ones) and commit finished rows as they
    finish: a part every checkpoint.every_rows rows or checkpoint.every_seconds, whichever comes
    first, so a kill loses at most one part's rows besides those still generating. On a signal no
    new batch starts; the rows already in the engine finish and are committed.
    Yields each part committed here, with its rows."""
    row_of, batch_of = (plan.rows.column(k).to_numpy() for k in ("row", "batch"))
    override, notes, fps = (plan.rows.column(k) for k in ("prompt_override", "note", "row_fingerprint"))
    generator = SafeGenerator.for_job(engine, job.batching, job.generation.max_new_tokens)
    bar = Progress(len(todo), progress)
    pending: list[tuple[int, Completion]] = []
    last_commit = time.perf_counter()

    def requests():
        for _, group in itertools.groupby(todo.tolist(), key=lambda i: int(batch_of[i])):
            if stop.received is not None:
                return
            group = list(group)
            prompts = [o if o is not None else p for o, p in zip((override[i].as_py() for i in group), rows.prompts([int(row_of[i]) for i in group]))]
            for i, ids in zip(group, engine.tokenize(prompts)):
                yield Request(i, ids, row_seed(job.generation.seed, rows.ids[int(row_of[i])]))

    def commit():
        nonlocal last_commit
        now = time.perf_counter()
        seconds = now - last_commit
        stats.generate_seconds += seconds
        last_commit = now
        if not pending:
            return None
        at = [i for i, _ in pending]
        completions = [c for _, c in pending]
        table = results_table([int(row_of[i]) for i in at], [int(batch_of[i]) for i in at], completions, [fps[i].as_py() for i in at])
        tokens = sum(c.completion_tokens for c in completions)
        path = ckpt.write_part(plan, shard, shards, table, {"rows": len(at), "completion_tokens": tokens, "seconds": round(seconds, 3)})
        pending.clear()
        return path, row_of[at]

    for i, completion in generator.stream(requests()):
        note = notes[i].as_py()
        if note and completion.error is None:
            completion.error = note  # the row ran, truncated: say so
        pending.append((i, completion))
        stats.generated_rows += 1
        stats.completion_tokens += completion.completion_tokens
        stats.prompt_tokens += completion.prompt_tokens
        stats.oom_splits, stats.lowered_budget = generator.oom_splits, generator.lowered_budget
        stats.shared_prompt_tokens, stats.prefilled_prompt_tokens = engine.shared_prompt_tokens, engine.prefilled_prompt_tokens
        bar.update(stats.completion_tokens / max(stats.generate_seconds + time.perf_counter() - last_commit, 1e-9))
        if len(pending) >= job.checkpoint.every_rows or time.perf_counter() - last_commit >= job.checkpoint.every_seconds:
            if part := commit():
                yield part
    if part := commit():
        yield part
    bar.close()
    print(f"komt-batch: prompt tokens: {stats.prompt_tokens}; {stats.shared_prompt_tokens} shared (a prefix computed once), "
          f"{stats.prefilled_prompt_tokens} prefilled" + ("" if job.batching.share_prefix else " (batching.share_prefix: false)"),
          file=sys.stderr, flush=True)


def plan(job: JobConfig, restart: bool = False) -> dict:
    """Make and store the job's plan, as the first shard of a run would, without the model's
    weights (slurm/submit.sh runs it once before the array: a plan that fails, fails before any GPU
    is allocated, and no shard plans). A stored plan that still matches is kept."""
    opened = Opened.check(job)
    if opened.state == "done" and not restart:
        return already_done(job, opened.rows.table.num_rows)
    resuming = opened.ckpt.manifest_path.exists() and not restart
    fresh = None if resuming else opened.make_plan()
    opened.refuse_to_replace(resuming, restart)
    with opened.ckpt.job_lock(0, 1, restart) if restart else contextlib.nullcontext():
        stored = opened.open_plan(fresh)
    m = stored.manifest
    return {
        "job": job.source,
        "state": "planned",
        "plan_id": stored.plan_id,
        "planned_rows": m["planned_rows"],
        "settled_rows": m["settled_rows"],
        "batches": len(m["batch_sizes"]),
        "chunks": len(m["chunks"]),
        "checkpoint": str(opened.ckpt.dir),
    }


def validate(job: JobConfig, restart: bool = False) -> dict:
    """Check the job file, the input and the paths as `run` (or `run --restart`) does (a file at
    output.path included, and a stored checkpoint it would resume), and plan it in memory, without
    loading the model's weights."""
    opened = Opened.check(job)
    resuming = opened.ckpt.manifest_path.exists() and not restart
    opened.refuse_to_replace(resuming, restart)
    if resuming and opened.state != "done":  # what run would go on with: it must be whole, and of this job as it is now
        if stored := opened.ckpt.load_plan(PROGRESS_COLUMNS):
            check_unchanged(job, opened.ckpt, stored, opened.input_fp, opened.settings_fp)
    rows = opened.rows
    result = {"job": job.source, "input_files": len(rows.files), "rows": rows.table.num_rows}
    manifest, _, settled = opened.make_plan()
    result.update(
        planned_rows=manifest["planned_rows"],
        reused_rows=manifest["reused_rows"],
        error_rows=manifest["settled_rows"] - manifest["reused_rows"],
        errors_by_cause=count_results(settled)["errors_by_cause"],
        batches=len(manifest["batch_sizes"]),
        chunks=len(manifest["chunks"]),
        context=opened.context,
        output=job.output.path,
        state="done" if opened.state == "done" else "valid",  # (done: a run leaves the finished output alone)
    )
    return result
