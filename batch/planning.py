"""A job's plan: render and tokenize every prompt, settle the rows that cannot run (or are reused),
pack the rest into batches and chunks (batch.plan), and store it once in the checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import pyarrow as pa

from batch.checkpoint import Checkpoint, StoredPlan
from batch.config import JobConfig
from batch.errors import JobError
from batch.fingerprints import plan_changes, row_fingerprint, row_settings_key
from batch.plan import plan_batches, plan_chunks
from batch.results import Completion, error_completion, results_table
from batch.reuse import load_reusable
from batch.rows import Rows


def open_plan(job: JobConfig, ckpt: Checkpoint, make_fresh: Callable[[], tuple], input_fp: dict, settings_fp: dict) -> StoredPlan:
    """The stored plan, or a new one (make_fresh() gives make_plan's result) stored now if there is none.

    Many shards may start at once: the plan lock lets the first store its plan; the others find it."""
    with ckpt.plan_lock():
        stored = ckpt.load_plan()
        if stored:
            changes = plan_changes(stored.manifest, input_fp, settings_fp)
            if changes:
                raise JobError(
                    f"{job.source}: the input or settings changed since this run's plan was made "
                    f"({ckpt.dir}): " + "; ".join(changes) + ". Run with --restart to start over."
                )
            return stored
        manifest, plan_rows, settled = make_fresh()
        return ckpt.store_plan({**manifest, "input": input_fp, "settings": settings_fp}, plan_rows, settled)


def make_plan(job: JobConfig, rows: Rows, tokenizer, context: int, settings_fp: dict):
    """Render and tokenize every prompt; settle the rows that cannot run; pack the rest in batches.

    Each planned row gets the fingerprint of the prompt it runs with (its truncated prompt, if cut):
    a committed part must carry exactly these."""
    g, where = job.generation, job.source
    limit = context - g.max_new_tokens
    if limit < 1:
        raise JobError(f"{where}: generation.max_new_tokens: {g.max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens")
    key = row_settings_key(settings_fp)
    reusable = load_reusable(job)
    planned: list[tuple[int, int, str | None, str | None, str]] = []  # row, prompt tokens, truncated prompt, note, fingerprint
    settled: list[tuple[int, Completion, str]] = []
    for start, prompts in rows.slices():
        todo = []
        for offset, p in enumerate(prompts):
            r = start + offset
            if isinstance(p, ValueError):
                settled.append((r, error_completion(f"bad_input: {p}"), ""))
                continue
            fp = row_fingerprint(key, rows.ids[r], p)
            if fp in reusable:
                settled.append((r, reusable[fp], fp))
            else:
                todo.append((r, p, fp))
        lengths = [len(t) for t in tokenizer([p for _, p, _ in todo], add_special_tokens=True)["input_ids"]] if todo else []
        for (r, p, fp), n in zip(todo, lengths):
            if n <= limit:
                planned.append((r, n, None, None, fp))
            elif job.input.too_long == "truncate":
                cut = truncate_prompt(rows, r, tokenizer, limit)
                if isinstance(cut, str):
                    settled.append((r, error_completion(f"too_long: {cut}", n), fp))
                else:
                    planned.append((r, cut[1], cut[0], f"truncated: {cut[2]}", row_fingerprint(key, rows.ids[r], cut[0])))
            else:
                settled.append((r, error_completion(f"too_long: the prompt has {n} tokens; at most {limit} fit (context {context} - max_new_tokens {g.max_new_tokens})", n), fp))
    lengths = [p[1] for p in planned]
    if lengths and max(lengths) + g.max_new_tokens > job.batching.max_batch_tokens:
        raise JobError(
            f"{where}: batching.max_batch_tokens: {job.batching.max_batch_tokens} is too small for one row: "
            f"the longest prompt ({max(lengths)} tokens) + max_new_tokens ({g.max_new_tokens}) needs {max(lengths) + g.max_new_tokens}"
        )
    batches = plan_batches(lengths, g.max_new_tokens, job.batching.max_batch_size, job.batching.max_batch_tokens)
    chunks = plan_chunks(batches, lengths, g.max_new_tokens, job.checkpoint.every_rows)
    order = [(b, i) for b, batch in enumerate(batches) for i in batch]
    chunk_of = {b: c.index for c in chunks for b in c.batches}
    plan_rows = pa.table(
        {
            "row": pa.array([planned[i][0] for _, i in order], pa.int64()),
            "batch": pa.array([b for b, _ in order], pa.int32()),
            "chunk": pa.array([chunk_of[b] for b, _ in order], pa.int32()),
            "prompt_tokens": pa.array([planned[i][1] for _, i in order], pa.int32()),
            "prompt_override": pa.array([planned[i][2] for _, i in order], pa.string()),
            "note": pa.array([planned[i][3] for _, i in order], pa.string()),
            "row_fingerprint": pa.array([planned[i][4] for _, i in order], pa.string()),
        }
    )
    settled_table = results_table([r for r, _, _ in settled], -1, [c for _, c, _ in settled], [fp for _, _, fp in settled])
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "context": context,
        "planned_rows": len(planned),
        "settled_rows": len(settled),
        "reused_rows": sum(1 for _, c, _ in settled if c.finish_reason != "error"),
        "batch_sizes": [len(b) for b in batches],
        "chunks": [asdict(c) for c in chunks],
    }
    return manifest, plan_rows, settled_table


def truncate_prompt(rows: Rows, r: int, tokenizer, limit: int) -> tuple[str, int, str] | str:
    """Cut the longest template field from its end until the prompt fits; the rest stays intact.

    Returns (prompt, tokens, what was cut), or why it cannot fit (the template alone is too long)."""
    values = rows.table.select(list(rows.template.fields)).slice(r, 1).to_pylist()[0]
    name = max(rows.template.fields, key=lambda f: len(values[f]))
    field_ids = tokenizer(values[name], add_special_tokens=False)["input_ids"]
    original = len(field_ids)
    keep = len(field_ids)
    while keep > 0:
        prompt_ids = tokenizer(rows.template.text.format(**{**values, name: tokenizer.decode(field_ids[:keep])}))["input_ids"]
        over = len(prompt_ids) - limit
        if over <= 0:
            text = rows.template.text.format(**{**values, name: tokenizer.decode(field_ids[:keep])})
            return text, len(prompt_ids), f"field {name!r} cut from {original} to {keep} tokens to fit {limit}"
        keep -= over
    return f"even with field {name!r} ({original} tokens) cut to nothing, the prompt does not fit in {limit} tokens"
