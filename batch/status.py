"""`status` (progress of a run, from its checkpoint) and `merge` (the final file of a sharded run)."""

from __future__ import annotations

from pathlib import Path

from batch.checkpoint import Checkpoint, StoredPlan
from batch.config import JobConfig
from batch.errors import IncompleteError, JobError
from batch.fingerprints import input_fingerprint, plan_changes, settings_fingerprint
from batch.plan import assign_shards
from batch.results import count_results
from batch.rows import read_rows
from batch.writer import assemble, summary_path, write_summary


def shard_counts(ckpt: Checkpoint) -> list[int]:
    """The shard counts N seen in lock files (shard-I-of-N.lock)."""
    return sorted({int(p.stem.split("-of-")[1]) for p in ckpt.dir.glob("shard-*-of-*.lock")})


def status(job: JobConfig, shards: int | None = None) -> dict:
    ckpt = Checkpoint(job.parts_dir)
    out = Path(job.output.path)
    plan = ckpt.load_plan()
    if plan is None:
        state = "finished" if out.exists() else "not started"
        return {"job": job.source, "state": state, "output": str(out)}
    done = ckpt.done_batches(plan, verify=False)
    sizes = plan.manifest["batch_sizes"]
    total = plan.manifest["planned_rows"] + plan.manifest["settled_rows"]
    rows_done = sum(sizes[b] for b in done) + plan.manifest["settled_rows"]
    chunks_done = [c for c in plan.chunks if all(b in done for b in c.batches)]
    parts = [ckpt.part_stats(p) for p in set(done.values())]
    seconds = sum(p.get("seconds", 0) for p in parts)
    rows_gen = sum(p.get("rows", 0) for p in parts)
    tokens = sum(p.get("completion_tokens", 0) for p in parts)
    remaining = total - rows_done
    rows = read_rows(job)
    changes = plan_changes(plan.manifest, input_fingerprint(rows), settings_fingerprint(job))
    result = {
        "job": job.source,
        "state": "done" if remaining == 0 else "in progress",
        "rows_done": rows_done,
        "rows_total": total,
        "chunks_done": len(chunks_done),
        "chunks_total": len(plan.chunks),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "eta_seconds": round(remaining * seconds / rows_gen) if rows_gen else None,
        "plan_matches": not changes,
        "changes": changes,
        "errors_by_cause": count_results(ckpt.read_results(plan))["errors_by_cause"],
    }
    for n in [shards] if shards else shard_counts(ckpt):
        if n and n > 1:
            owner = assign_shards(plan.chunks, n)
            result[f"shards_of_{n}"] = {
                f"{s}/{n}": f"{sum(1 for c in chunks_done if owner[c.index] == s)}/{owner.count(s)} chunks"
                for s in range(n)
            }
    return result


def missing_chunks(ckpt: Checkpoint, plan: StoredPlan, shards: int | None) -> str:
    done = ckpt.done_batches(plan)
    missing = [c for c in plan.chunks if not all(b in done for b in c.batches)]
    if not missing:
        return ""
    counts = [shards] if shards else shard_counts(ckpt) or [1]
    lines = [f"{len(missing)} of {len(plan.chunks)} chunks are not done: {[c.index for c in missing][:20]}"]
    for n in counts:
        owner = assign_shards(plan.chunks, n)
        by_shard = sorted({owner[c.index] for c in missing})
        lines.append(f"missing shards (of {n}): " + ", ".join(f"{s}/{n}" for s in by_shard))
    return "; ".join(lines)


def merge(job: JobConfig, shards: int | None = None) -> dict:
    """Write the final file from the checkpoint when every chunk is done."""
    ckpt = Checkpoint(job.parts_dir)
    plan = ckpt.load_plan()
    if plan is None:
        raise IncompleteError(f"{job.source}: nothing to merge: no plan in {ckpt.dir} (has any shard started?)")
    missing = missing_chunks(ckpt, plan, shards)
    if missing:
        raise IncompleteError(f"{job.source}: cannot merge yet: {missing}. Rerun those shards, then merge again.")
    rows = read_rows(job)
    changes = plan_changes(plan.manifest, input_fingerprint(rows), settings_fingerprint(job))
    if changes:
        raise JobError(f"{job.source}: the input or settings changed since the plan was made: " + "; ".join(changes))
    results = ckpt.read_results(plan)
    out = assemble(job, rows.table, results)
    summary = {"job": job.source, "output": str(out), "rows": rows.table.num_rows, **count_results(results)}
    summary["generated_rows"] = plan.manifest["planned_rows"]
    summary["reused_rows"] = plan.manifest["reused_rows"]
    write_summary(summary_path(job), summary)
    if not job.checkpoint.keep:
        ckpt.remove()
    return summary
