"""The job, top to bottom: read the input -> plan once -> generate this shard's batches -> commit
parts -> the final file. `validate` runs the same steps up to the plan, without the model.

One row's way: rows (readers + template) -> planning (plan) -> engine -> checkpoint parts -> writer.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass

import pyarrow as pa
from tqdm import tqdm

from batch.checkpoint import Checkpoint, StoredPlan
from batch.config import JobConfig
from batch.engine import Engine, Request, SafeGenerator, row_seed
from batch.loading import load_tokenizer
from batch.fingerprints import row_fingerprint, row_settings_key
from batch.paths import check_output_writable
from batch.plan import assign_shards
from batch.planning import make_plan, open_plan
from batch.results import Completion, count_results, results_table
from batch.rows import Rows, read_rows
from batch.signals import Interrupted, StopFlag
from batch.writer import assemble, summary_path, write_summary


def run(job: JobConfig, shard: int = 0, shards: int = 1, restart: bool = False, progress: bool = True, resume_hint: str = "") -> dict:
    """Generate this shard's batches; when unsharded, also write the final file. Returns the summary."""
    started = time.time()
    stop = StopFlag()
    with stop.installed():  # from the start: a signal while planning still ends in exit 75
        return _run(job, shard, shards, restart, progress, resume_hint, started, stop)


def _run(job, shard, shards, restart, progress, resume_hint, started, stop: StopFlag) -> dict:
    check_output_writable(job)
    ckpt = Checkpoint(job.parts_dir)
    rows = read_rows(job)
    # Every check that can fail on the user's input runs before anything is written: the model's
    # files (tokenizer, adapter shapes) and, when there is no plan yet, the plan itself.
    tokenizer, context = load_tokenizer(job.model, job.source)
    fresh = make_plan(job, rows, tokenizer, context) if restart or not ckpt.manifest_path.exists() else None
    with ckpt.shard_lock(shard, shards):
        plan = open_plan(job, rows, ckpt, restart, fresh)
        owner = assign_shards(plan.chunks, shards)
        done = ckpt.done_batches(plan)
        batch_rows = plan.batch_rows()
        mine = [b for c in plan.chunks if owner[c.index] == shard for b in c.batches]
        todo = [b for b in mine if b not in done]
        stats = Stats(resumed_rows=sum(len(batch_rows[b]) for b in mine if b in done))
        if todo and stop.received is None:
            engine = Engine.load(job.model, job.generation, job.source, tokenizer)
            print(
                f"komt-batch: generating {sum(len(batch_rows[b]) for b in todo)} rows in {len(todo)} batches"
                f" (shard {shard}/{shards}; {stats.resumed_rows} rows already done)",
                file=sys.stderr,
                flush=True,
            )
            generate_batches(job, rows, plan, ckpt, engine, todo, batch_rows, stop, stats, progress)
        if stop.received is not None:
            raise Interrupted(
                f"komt-batch: stopped by {signal.Signals(stop.received).name} after committing every finished row "
                f"({stats.generated_rows} generated this run). Run the same command again to resume{resume_hint}."
            )
        summary = stats.summary(job, plan, started)
        if shards == 1:
            results = ckpt.read_results(plan)
            out = assemble(job, rows.table, results)
            summary.update(count_results(results), output=str(out), rows=rows.table.num_rows)
            write_summary(summary_path(job), summary)
            if not job.checkpoint.keep:
                ckpt.remove()
        else:
            summary.update(shard=f"{shard}/{shards}")
            write_summary(ckpt.dir / f"summary-shard-{shard}-of-{shards}.json", summary)
        return summary


@dataclass
class Stats:
    resumed_rows: int = 0
    generated_rows: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    generate_seconds: float = 0.0
    oom_splits: int = 0
    lowered_budget: int | None = None

    def summary(self, job: JobConfig, plan: StoredPlan, started: float) -> dict:
        wall = time.time() - started
        return {
            "job": job.source,
            "planned_rows": plan.manifest["planned_rows"],
            "reused_rows": plan.manifest["reused_rows"],
            "resumed_rows": self.resumed_rows,
            "generated_rows": self.generated_rows,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "generate_seconds": round(self.generate_seconds, 3),
            "tokens_per_second": round(self.completion_tokens / self.generate_seconds, 1) if self.generate_seconds else 0.0,
            "wall_seconds": round(wall, 3),
            "oom_splits": self.oom_splits,
            "lowered_max_batch_tokens": self.lowered_budget,
        }


def generate_batches(job, rows: Rows, plan: StoredPlan, ckpt: Checkpoint, engine: Engine, todo: list[int], batch_rows, stop: StopFlag, stats: Stats, progress: bool) -> None:
    """The hot loop: stream the batches' rows through the engine (finished rows' places are refilled
    from the next batches), collect each batch's results, commit parts in batch order, stop cleanly
    on a signal (no new batch starts; the rows already in the engine finish and are committed)."""
    overrides = dict(zip(plan.rows.column("row").to_pylist(), plan.rows.column("prompt_override").to_pylist()))
    notes = {r: n for r, n in zip(plan.rows.column("row").to_pylist(), plan.rows.column("note").to_pylist()) if n}
    key = row_settings_key(job)
    generator = SafeGenerator.for_job(engine, job.batching, job.generation.max_new_tokens)
    bar = tqdm(total=sum(len(batch_rows[b]) for b in todo), unit="row", disable=not progress, mininterval=1.0, dynamic_ncols=True)
    chunk_of = {b: c.index for c in plan.chunks for b in c.batches}
    prompts_of: dict[int, list[str]] = {}
    results: dict[int, list[Completion | None]] = {}
    pending: list[tuple[int, pa.Table]] = []
    pending_stats = {"rows": 0, "completion_tokens": 0, "seconds": 0.0}
    last_commit, last_release = time.time(), time.perf_counter()

    def requests():
        for b in todo:
            if stop.received is not None:
                return
            indices = batch_rows[b]
            prompts_of[b] = [overrides[r] if overrides[r] is not None else p for r, p in zip(indices, rows.prompts(indices))]
            results[b] = [None] * len(indices)
            for j, ids in enumerate(engine.tokenize(prompts_of[b])):
                yield Request((b, j), ids, row_seed(job.generation.seed, rows.ids[indices[j]]))

    def commit():
        nonlocal pending, last_commit
        if pending:
            ckpt.write_part(pending[0][0], pending[-1][0], pa.concat_tables(t for _, t in pending), dict(pending_stats))
            pending = []
            pending_stats.update(rows=0, completion_tokens=0, seconds=0.0)
        last_commit = time.time()

    def release(i: int, b: int) -> None:
        """Batch b (todo[i]) is whole: add it to the pending part; commit at a chunk's end or when due."""
        nonlocal last_release
        indices, completions, prompts = batch_rows[b], results.pop(b), prompts_of.pop(b)
        now = time.perf_counter()
        seconds, last_release = now - last_release, now
        for r, c in zip(indices, completions):
            if r in notes and c.error is None:
                c.error = notes[r]  # the row ran, truncated: say so
        fps = [row_fingerprint(key, rows.ids[r], p) for r, p in zip(indices, prompts)]
        pending.append((b, results_table(indices, b, completions, fps)))
        tokens = sum(c.completion_tokens for c in completions)
        pending_stats["rows"] += len(indices)
        pending_stats["completion_tokens"] += tokens
        pending_stats["seconds"] += seconds
        stats.generated_rows += len(indices)
        stats.completion_tokens += tokens
        stats.prompt_tokens += sum(c.prompt_tokens for c in completions)
        stats.generate_seconds += seconds
        stats.oom_splits, stats.lowered_budget = generator.oom_splits, generator.lowered_budget
        bar.update(len(indices))
        bar.set_postfix_str(f"{stats.completion_tokens / max(stats.generate_seconds, 1e-9):.1f} tok/s", refresh=False)
        nxt = todo[i + 1] if i + 1 < len(todo) else None
        if (
            nxt != b + 1
            or chunk_of[nxt] != chunk_of[b]
            or pending_stats["rows"] >= job.checkpoint.every_rows
            or time.time() - last_commit >= job.checkpoint.every_seconds
        ):
            commit()

    released = 0  # todo[:released] are in pending parts or committed
    left = {b: len(batch_rows[b]) for b in todo}
    for (b, j), completion in generator.stream(requests()):
        results[b][j] = completion
        left[b] -= 1
        while released < len(todo) and left[todo[released]] == 0:  # (0 only once fed and done)
            release(released, todo[released])
            released += 1
    commit()
    bar.close()


def validate(job: JobConfig) -> dict:
    """Check the job file and the input, and plan it in memory, without loading the model's weights."""
    check_output_writable(job)
    rows = read_rows(job)
    result = {"job": job.source, "input_files": len(rows.files), "rows": rows.table.num_rows}
    tokenizer, context = load_tokenizer(job.model, job.source)
    manifest, _, settled = make_plan(job, rows, tokenizer, context)
    result.update(
        planned_rows=manifest["planned_rows"],
        reused_rows=manifest["reused_rows"],
        error_rows=manifest["settled_rows"] - manifest["reused_rows"],
        errors_by_cause=count_results(settled)["errors_by_cause"],
        batches=len(manifest["batch_sizes"]),
        chunks=len(manifest["chunks"]),
        context=context,
        output=job.output.path,
        state="valid",
    )
    return result
