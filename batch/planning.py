"""A job's plan: render and tokenize every prompt, settle the rows that cannot run (or are reused),
pack the rest into batches and chunks (batch.plan), and store it once in the checkpoint."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.checkpoint import FINGERPRINT_CHARS, Checkpoint, StoredPlan, fixed_width_strings
from batch.config import JobConfig
from batch.errors import JobError
from batch.fingerprints import plan_changes, row_fingerprint, row_settings_key
from batch.plan import group_chunks, pack_batches
from batch.results import error_completion, results_table
from batch.reuse import load_reusable
from batch.rows import Rows


def open_plan(job: JobConfig, ckpt: Checkpoint, make_fresh: Callable[[], tuple], input_fp: dict, settings_fp: dict) -> StoredPlan:
    """The stored plan, or a new one (make_fresh() gives make_plan's result) stored now if there is none.

    Many shards may start at once: the plan lock lets the first store its plan; the others find it."""
    with ckpt.plan_lock():
        stored = ckpt.load_plan()
        if stored:
            check_unchanged(job, ckpt, stored, input_fp, settings_fp)
            print(f"komt-batch: using the plan stored in {ckpt.dir}", file=sys.stderr, flush=True)
            return stored
        manifest, plan_rows, settled = make_fresh()
        stored = ckpt.store_plan({**manifest, "input": input_fp, "settings": settings_fp}, plan_rows, settled)
        print(
            f"komt-batch: planned {manifest['planned_rows']} rows in {len(manifest['batch_sizes'])} batches, "
            f"{len(manifest['chunks'])} chunks ({manifest['settled_rows']} rows settled without generating); stored in {ckpt.dir}",
            file=sys.stderr,
            flush=True,
        )
        return stored


def check_unchanged(job: JobConfig, ckpt: Checkpoint, stored: StoredPlan, input_fp: dict, settings_fp: dict) -> None:
    """A stored plan goes on only with the input and settings it was made from."""
    changes = plan_changes(stored.manifest, input_fp, settings_fp)
    if changes:
        raise JobError(
            f"{job.source}: the input or settings changed since this run's plan was made "
            f"({ckpt.dir}): " + "; ".join(changes) + ". Run with --restart to start over."
        )


def make_plan(job: JobConfig, rows: Rows, tokenizer, context: int, settings_fp: dict):
    """Render and tokenize every prompt; settle the rows that cannot run; pack the rest in batches.

    Each planned row gets the fingerprint of the prompt it runs with (its truncated prompt, if cut):
    a committed part must carry exactly these. Python objects live for one slice of the input; what
    the whole plan keeps is Arrow and numpy arrays (about 60 bytes a planned row)."""
    g, where = job.generation, job.source
    limit = context - g.max_new_tokens
    if limit < 1:
        raise JobError(f"{where}: generation.max_new_tokens: {g.max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens")
    key = row_settings_key(settings_fp)
    reusable = load_reusable(job)
    # The planned rows' row, prompt tokens and fingerprint: 44 bytes a row, allocated once for all
    # (arrays grown slice by slice would fragment the heap among the slices' Python objects).
    n = rows.table.num_rows
    row_of, lengths, fps = np.empty(n, np.int64), np.empty(n, np.int32), np.empty(n, f"S{FINGERPRINT_CHARS}")
    count = 0
    cut: dict[int, tuple[str, str]] = {}  # row -> (truncated prompt, note)
    settled_tables = []
    for start, prompts in rows.slices():
        todo, settled = [], []
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
        counted = prompt_lengths(tokenizer, [p for _, p, _ in todo])
        here: list[tuple[int, int, str]] = []
        for (r, p, fp), tokens in zip(todo, counted):
            if tokens <= limit:
                here.append((r, tokens, fp))
            elif job.input.too_long == "truncate":
                fitted = truncate_prompt(rows, r, tokenizer, limit)
                if isinstance(fitted, str):
                    settled.append((r, error_completion(f"too_long: {fitted}", tokens), fp))
                else:
                    cut[r] = (fitted[0], f"truncated: {fitted[2]}")
                    here.append((r, fitted[1], row_fingerprint(key, rows.ids[r], fitted[0])))
            else:
                settled.append((r, error_completion(f"too_long: the prompt has {tokens} tokens; at most {limit} fit (context {context} - max_new_tokens {g.max_new_tokens})", tokens), fp))
        if here:
            row_of[count : count + len(here)], lengths[count : count + len(here)], fps[count : count + len(here)] = zip(*here)
            count += len(here)
        if settled:
            settled_tables.append(results_table([r for r, _, _ in settled], -1, [c for _, c, _ in settled], [fp for _, _, fp in settled]))
    # From here on, arrays of the planned rows only, each freed once used: about 100 bytes a row at
    # the peak, 56 in the plan table.
    row_of, lengths, fps = row_of[:count], lengths[:count], fps[:count]
    if len(lengths) and int(lengths.max()) + g.max_new_tokens > job.batching.max_batch_tokens:
        raise JobError(
            f"{where}: batching.max_batch_tokens: {job.batching.max_batch_tokens} is too small for one row: "
            f"the longest prompt ({lengths.max()} tokens) + max_new_tokens ({g.max_new_tokens}) needs {int(lengths.max()) + g.max_new_tokens}"
        )
    order, starts = pack_batches(lengths, g.max_new_tokens, job.batching.max_batch_size, job.batching.max_batch_tokens)
    sizes = np.diff(np.append(starts, len(order)))
    costs = sizes * (lengths[order[starts]].astype(np.int64) + g.max_new_tokens) if len(order) else sizes
    chunks = group_chunks(sizes.tolist(), costs.tolist(), job.checkpoint.every_rows)
    batch_of = np.repeat(np.arange(len(starts), dtype=np.int32), sizes)
    chunk_of_batch = np.zeros(len(starts), np.int32)
    for c in chunks:
        chunk_of_batch[c.first_batch : c.last_batch + 1] = c.index
    row_of = row_of[order]  # execution order, one array at a time (each replaced is freed)
    lengths = lengths[order]
    fps = fps[order]
    del order
    overrides = [cut.get(int(r), (None, None)) for r in row_of] if cut else None
    plan_rows = pa.table(
        {
            "row": pa.array(row_of, pa.int64()),
            "batch": pa.array(batch_of, pa.int32()),
            "chunk": pa.array(chunk_of_batch[batch_of], pa.int32()),
            "prompt_tokens": pa.array(lengths, pa.int32()),
            "prompt_override": pa.array([o[0] for o in overrides], pa.string()) if cut else pa.nulls(len(row_of), pa.string()),
            "note": pa.array([o[1] for o in overrides], pa.string()) if cut else pa.nulls(len(row_of), pa.string()),
            "row_fingerprint": fixed_width_strings(fps),
        }
    )
    settled_table = pa.concat_tables(settled_tables) if settled_tables else results_table([], -1, [], [])
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "context": context,
        "planned_rows": plan_rows.num_rows,
        "settled_rows": settled_table.num_rows,
        "reused_rows": settled_table.num_rows - pc.sum(pc.equal(settled_table.column("finish_reason"), "error")).as_py() if settled_table.num_rows else 0,
        "batch_sizes": sizes.tolist(),
        "chunks": [asdict(c) for c in chunks],
    }
    return manifest, plan_rows, settled_table


def prompt_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Each prompt's tokens, as tokenizer(prompts) counts them (special tokens added). A fast
    tokenizer's own backend does it without building the id lists (1.7x faster on 300-character
    prompts: at 10 million rows, tokenizing is most of planning)."""
    if not prompts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [len(e) for e in backend.encode_batch_fast(prompts, add_special_tokens=True)]
    return [len(t) for t in tokenizer(prompts, add_special_tokens=True)["input_ids"]]


def truncate_prompt(rows: Rows, r: int, tokenizer, limit: int) -> tuple[str, int, str] | str:
    """Cut the longest template field (in tokens) from its end until the prompt fits; the rest stays
    intact.

    Returns (prompt, tokens, what was cut), or why it cannot fit (the template alone is too long)."""
    values = rows.table.select(list(rows.template.fields)).slice(r, 1).to_pylist()[0]
    names = list(rows.template.fields)
    ids = tokenizer([values[f] for f in names], add_special_tokens=False)["input_ids"]
    name, field_ids = max(zip(names, ids), key=lambda pair: len(pair[1]))  # (a tie: the first field)
    original = len(field_ids)
    keep = len(field_ids)
    uses = max(1, rows.template.uses(name))  # a token cut from the field shortens the prompt this many times
    while True:
        text = rows.template.text.format(**{**values, name: tokenizer.decode(field_ids[:keep])})
        prompt_ids = tokenizer(text)["input_ids"]
        over = len(prompt_ids) - limit
        if over <= 0:
            return text, len(prompt_ids), f"field {name!r} cut from {original} to {keep} tokens to fit {limit}"
        if keep == 0:
            return f"even with field {name!r} ({original} tokens) cut to nothing, the prompt does not fit in {limit} tokens"
        keep = max(0, keep - -(-over // uses))
