"""`status` (progress of a run, from its checkpoint) and `merge` (the final file of a sharded run)."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from batch.checkpoint import PROGRESS_COLUMNS, Checkpoint, Done, StoredPlan
from batch.config import JobConfig
from batch.errors import IncompleteError, JobError
from batch.fingerprints import input_fingerprint, plan_changes, settings_fingerprint
from batch.finished import already_done, output_state, refuse_to_replace
from batch.paths import check_output_writable
from batch.plan import assign_shards
from batch.results import count_results
from batch.rows import read_rows
from batch.signals import StopFlag
from batch.writer import finish_job, finish_leftovers, leftovers, remove_stale_temporaries

NO_PLAN_STATES = {
    "absent": "not started",
    "done": "done",
    "changed": "not started; output.path holds an output of another input or settings",
    "foreign": "not started; output.path holds a file komt-batch did not write",
}


def shard_counts(ckpt: Checkpoint) -> list[int]:
    """The shard counts N seen in lock files (shard-I-of-N.lock)."""
    return sorted({int(p.stem.split("-of-")[1]) for p in ckpt.dir.glob("shard-*-of-*.lock")})


def rows_left(plan: StoredPlan, done: Done) -> np.ndarray:
    """The planned rows not done yet, by chunk."""
    open_rows = ~done.mask(plan.rows.column("row").to_numpy())
    return np.bincount(plan.rows.column("chunk").to_numpy()[open_rows], minlength=len(plan.chunks))


def chunks_done(plan: StoredPlan, done: Done) -> set[int]:
    """The chunks whose planned rows are all done."""
    left = rows_left(plan, done)
    return {c.index for c in plan.chunks if not left[c.index]}


def status(job: JobConfig, shards: int | None = None) -> dict:
    """Progress from the checkpoint (read only: it changes nothing, and works while a run goes on,
    or finishes: a checkpoint that changes under it is read again, and a finished output is done)."""
    ckpt = Checkpoint.of(job)
    rows = read_rows(job)
    ckpt.check_place(job, rows.files)
    input_fp, settings_fp = input_fingerprint(rows), settings_fingerprint(job)
    failed = 0
    while True:
        state, changes = output_state(job, input_fp, settings_fp)
        try:
            plan = ckpt.load_plan(PROGRESS_COLUMNS)
            if plan is not None:
                result = progress(job, ckpt, plan, shards, input_fp, settings_fp)
                break
        except JobError:  # a run changed the checkpoint under it (finished, or set a part aside): read again
            if output_state(job, input_fp, settings_fp)[0] != "done":
                failed += 1
                if failed < 3:
                    continue
                raise
        state, changes = output_state(job, input_fp, settings_fp)  # (finished meanwhile, perhaps)
        result = {"job": job.source, "state": NO_PLAN_STATES[state], "output": job.output.path, **({"changes": changes} if changes else {})}
        break
    if state == "done":
        result["state"] = "done"
        left = leftovers(job, ckpt)
        if left:
            result["not_finished"] = (
                f"{' and '.join(left)}: the run that wrote the output stopped before it wrote or removed them "
                "(or is doing it now); the next run or merge finishes it"
            )
    return result


def progress(job: JobConfig, ckpt: Checkpoint, plan: StoredPlan, shards: int | None, input_fp: dict, settings_fp: dict) -> dict:
    done, bad = ckpt.done_rows(plan, set_aside=False)
    total = plan.manifest["planned_rows"] + plan.manifest["settled_rows"]
    rows_done = len(done) + plan.manifest["settled_rows"]
    finished_chunks = chunks_done(plan, done)
    parts = [ckpt.part_stats(p) for p in done.parts]
    seconds = sum(p.get("seconds", 0) for p in parts)
    rows_gen = sum(p.get("rows", 0) for p in parts)
    tokens = sum(p.get("completion_tokens", 0) for p in parts)
    remaining = total - rows_done
    changes = plan_changes(plan.manifest, input_fp, settings_fp)
    counts = [shards] if shards else shard_counts(ckpt)
    newest = newest_part(done.parts)
    # the shards side by side: as asked, else as the newest part was committed (lock files of an earlier count stay)
    side_by_side = shards or (int(newest[0].name.split("-")[3]) if newest else max(counts, default=1)) or 1
    result = {
        "job": job.source,
        "state": "rows done; the final file is not written yet (the run writes it, or merge)" if remaining == 0 else "partly done" if done.parts else "planned; no row committed yet",
        "rows_done": rows_done,
        "rows_total": total,
        "chunks_done": len(finished_chunks),
        "chunks_total": len(plan.chunks),
        "last_commit": last_commit(newest),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "eta_seconds": round(rows_left_in_slowest_shard(plan, done, side_by_side) * seconds / rows_gen) if rows_gen else None,
        **({"eta_assumes": f"the {side_by_side} shards run side by side"} if side_by_side > 1 else {}),
        "plan_matches": not changes,
        "changes": changes,
        "errors_by_cause": count_results(ckpt.iter_results(done, ["row", "finish_reason", "error"]))["errors_by_cause"],
    }
    if bad:
        result["parts_set_aside_next_run"] = bad
    for n in counts:
        if n and n > 1:
            owner = assign_shards(plan.chunks, n)
            owned, finished = Counter(owner), Counter(owner[c] for c in finished_chunks)  # (one pass each, whatever n is)
            per_shard = {f"{s}/{n}": f"{finished[s]}/{owned[s]} chunks" for s in sorted(owned)}  # (shards past the chunk count own none: not listed one by one)
            if n > len(per_shard):
                per_shard["others"] = f"{n - len(per_shard)} shards own no chunk"
            result[f"shards_of_{n}"] = per_shard
    return result


def newest_part(parts: list[Path]) -> tuple[Path, float] | None:
    """The part committed last (part-I-of-N-...), and when."""
    times = []
    for p in parts:
        with contextlib.suppress(FileNotFoundError):  # (a run finishing meanwhile)
            times.append((p.stat().st_mtime, p))
    return max(times)[::-1] if times else None


def last_commit(newest: tuple[Path, float] | None) -> str:
    """When the newest part was committed, and how long ago (status cannot see whether a run goes on:
    shards may run on other machines; a run commits a part every checkpoint.every_rows rows or
    every_seconds)."""
    if newest is None:
        return "none yet"
    ago = max(time.time() - newest[1], 0)
    when = datetime.fromtimestamp(newest[1], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{when} ({tqdm.format_interval(ago)} ago)"


def rows_left_in_slowest_shard(plan: StoredPlan, done: Done, shards: int) -> int:
    """The rows left in the shard with the most left (all of them, unsharded): what the time left is
    counted by, the shards running side by side."""
    left = rows_left(plan, done)
    if shards <= 1 or not len(left):
        return int(left.sum())
    return int(np.bincount(assign_shards(plan.chunks, shards), weights=left, minlength=shards).max())


SHARD_SUMS = ("prompt_tokens", "shared_prompt_tokens", "prefilled_prompt_tokens", "completion_tokens", "generate_seconds", "oom_splits", "cpu_threads_lowered")


def shard_totals(ckpt: Checkpoint) -> dict:
    """The shards' own summaries (each shard's last run) summed for the merged summary: tokens, the
    seconds generating (each process's, added up), tok/s over them, out-of-memory splits, and the
    lowest lowered batch budget."""
    found = []
    for path in sorted(ckpt.dir.glob("summary-shard-*-of-*.json")):
        with contextlib.suppress(OSError, ValueError):
            found.append(json.loads(path.read_text()))
    if not found:
        return {}
    totals = {k: sum(s.get(k) or 0 for s in found) for k in SHARD_SUMS}
    totals["generate_seconds"] = round(totals["generate_seconds"], 3)
    seconds = totals["generate_seconds"]
    lowered = [s["lowered_max_batch_tokens"] for s in found if s.get("lowered_max_batch_tokens")]
    return {**totals, "tokens_per_second": round(totals["completion_tokens"] / seconds, 1) if seconds else 0.0,
            "lowered_max_batch_tokens": min(lowered, default=None), "shard_summaries": len(found)}


def missing_chunks(ckpt: Checkpoint, plan: StoredPlan, done: Done, shards: int | None) -> str:
    finished = chunks_done(plan, done)
    missing = [c.index for c in plan.chunks if c.index not in finished]
    if not missing:
        return ""
    counts = [shards] if shards else shard_counts(ckpt) or [1]
    lines = [f"{len(missing)} of {len(plan.chunks)} chunks are not done: {missing[:20]}"]
    for n in counts:
        owner = assign_shards(plan.chunks, n)
        by_shard = sorted({owner[c] for c in missing})
        lines.append(f"missing shards (of {n}): " + ", ".join(f"{s}/{n}" for s in by_shard))
    return "; ".join(lines)


def merge(job: JobConfig, shards: int | None, stop: StopFlag) -> dict:
    """Write the final file from the checkpoint when every chunk is done (a finished one is left alone)."""
    stop.check("before any work; nothing was written")
    check_output_writable(job)
    ckpt = Checkpoint.of(job)
    rows = read_rows(job)
    ckpt.check_place(job, rows.files)
    input_fp, settings_fp = input_fingerprint(rows), settings_fingerprint(job)
    state, _ = output_state(job, input_fp, settings_fp)
    if state == "done":
        if leftovers(job, ckpt):  # a run or merge stopped after its final file: finish that
            with ckpt.output_lock():
                if output_state(job, input_fp, settings_fp)[0] == "done":
                    finish_leftovers(job, ckpt)
        stop.finished()
        return already_done(job, rows.table.num_rows)
    if state == "foreign":
        raise refuse_to_replace(job, state, [])
    nothing = IncompleteError(f"{job.source}: nothing to merge: no plan in {ckpt.dir} (has any shard started?)")
    if not ckpt.manifest_path.exists():
        raise nothing
    with ckpt.job_lock(0, 1):
        plan = ckpt.load_plan(PROGRESS_COLUMNS)
        if plan is None:
            raise nothing
        changes = plan_changes(plan.manifest, input_fp, settings_fp)
        if changes:  # (before the missing shards: rerunning them would be refused for the same reason)
            raise JobError(f"{job.source}: the input or settings changed since the plan was made: " + "; ".join(changes) + ". Run with --restart to start over.")
        done, _ = ckpt.done_rows(plan)
        missing = missing_chunks(ckpt, plan, done, shards)
        if missing:
            raise IncompleteError(f"{job.source}: cannot merge yet: {missing}. Rerun those shards, then merge again.")
        remove_stale_temporaries(job, ckpt)
        stop.check("before writing the final file; nothing was lost")
        stop.start_work("finishing the final file first (every row is done)")
        made = {"job": job.source, "generated_rows": plan.manifest["planned_rows"], "reused_rows": plan.manifest["reused_rows"], **shard_totals(ckpt)}
        return finish_job(job, rows, ckpt, done, plan, stop, made)
