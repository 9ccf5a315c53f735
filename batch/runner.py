"""The job, top to bottom: read the input -> plan once -> generate this shard's batches -> commit
parts -> the final file. Also `status` and `merge`, which read the same checkpoint directory.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from batch.checkpoint import Checkpoint, StoredPlan
from batch.config import JobConfig
from batch.engine import Completion, Engine, Request, SafeGenerator, load_tokenizer, row_seed
from batch.errors import EXIT_INTERRUPTED, IncompleteError, JobError
from batch.plan import assign_shards, plan_batches, plan_chunks
from batch.readers import input_files, read_table, row_ids
from batch.template import Template
from batch.writer import GENERATED_COLUMNS, assemble, count_results, results_table, summary_path, write_summary

PROMPT_SLICE = 8192  # rows rendered and tokenized at a time while planning


class Interrupted(Exception):
    """Stopped by a signal after committing every finished row."""

    exit_code = EXIT_INTERRUPTED


# --- the input -----------------------------------------------------------------------------------


@dataclass
class Rows:
    files: list[Path]
    table: pa.Table
    ids: list[str]
    template: Template

    def prompts(self, indices: list[int]) -> list[str | ValueError]:
        """The prompts of these rows; a row whose template field is bad gives its ValueError."""
        values = self.table.select(list(self.template.fields)).take(indices).to_pylist()
        return [_render(self.template, v) for v in values]

    def slices(self):
        """(first row, prompts) for consecutive slices of the input."""
        fields = list(self.template.fields)
        for start in range(0, self.table.num_rows, PROMPT_SLICE):
            values = self.table.slice(start, PROMPT_SLICE).select(fields).to_pylist()
            yield start, [_render(self.template, v) for v in values]


def _render(template: Template, values: dict) -> str | ValueError:
    try:
        return template.render(values)
    except ValueError as e:
        return e


def read_rows(job: JobConfig) -> Rows:
    where = job.source
    try:
        files = input_files(job.input.path)
    except JobError as e:
        raise JobError(f"{where}: {e}") from None
    out = Path(job.output.path).resolve()
    if any(f.resolve() == out for f in files):
        raise JobError(f"{where}: output.path: {job.output.path} is also an input file; choose another path")
    template = Template.parse(job.prompt.template, where)
    table = read_table(files)
    if table.num_rows == 0:  # an empty input has no columns to speak of: give it the template's
        for name in [*template.fields, *([job.input.id_column] if job.input.id_column else [])]:
            if name not in table.column_names:
                table = table.append_column(name, pa.array([], pa.string()))
    template.check_columns(table.column_names, where)
    for name in [job.output.response_column, *GENERATED_COLUMNS]:
        if name in table.column_names:
            raise JobError(
                f"{where}: output: the input already has a column {name!r}; the output would repeat it"
                + (" (set output.response_column to another name)" if name == job.output.response_column else "")
            )
    return Rows(files, table, row_ids(table, job.input.id_column, where), template)


def check_output_writable(job: JobConfig) -> None:
    for path in (Path(job.output.path).parent, job.parts_dir):
        probe = path
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not _writable(probe):
            raise JobError(f"{job.source}: output.path: cannot write under {path} ({probe} is not a writable directory)")


def _writable(directory: Path) -> bool:
    return os.access(directory, os.W_OK | os.X_OK)


# --- fingerprints --------------------------------------------------------------------------------


def settings_fingerprint(job: JobConfig) -> dict:
    """Every setting that changes the plan or the outputs; a change refuses a resume."""
    d = job.as_dict()
    return {
        "model": {k: d["model"][k] for k in ("base", "adapter", "quantization", "compute_dtype")},
        "prompt": d["prompt"],
        "generation": d["generation"],
        "batching": d["batching"],
        "input": {k: d["input"][k] for k in ("id_column", "too_long")},
        "checkpoint": {"every_rows": d["checkpoint"]["every_rows"]},
    }


def row_settings_key(job: JobConfig) -> str:
    """The settings that decide a row's output (batching aside): part of each row's fingerprint."""
    s = settings_fingerprint(job)
    return json.dumps([s["model"], s["prompt"], s["generation"]], sort_keys=True)


def row_fingerprint(settings_key: str, row_id: str, prompt: str) -> str:
    return hashlib.sha256(f"{settings_key}\x00{row_id}\x00{prompt}".encode()).hexdigest()[:32]


def input_fingerprint(rows: Rows) -> dict:
    h = hashlib.sha256()
    for start, prompts in rows.slices():
        for row_id, p in zip(rows.ids[start : start + len(prompts)], prompts):
            h.update(f"{row_id}\x00{p}\x01".encode())
    files = [[str(f.resolve()), f.stat().st_size] for f in rows.files]
    return {"files": files, "rows": rows.table.num_rows, "content": h.hexdigest()}


def plan_changes(manifest: dict, input_fp: dict, settings_fp: dict) -> list[str]:
    """What differs between a stored plan and the input and settings now, in words."""
    changes = []
    old_in = manifest["input"]
    if old_in["files"] != input_fp["files"]:
        changes.append(f"input files: {_files(old_in['files'])} -> {_files(input_fp['files'])}")
    if old_in["rows"] != input_fp["rows"]:
        changes.append(f"input rows: {old_in['rows']} -> {input_fp['rows']}")
    elif old_in["content"] != input_fp["content"]:
        changes.append("input content: the ids or prompts changed")
    old, new = _flatten(manifest["settings"]), _flatten(settings_fp)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def _files(files: list) -> str:
    return ", ".join(f"{Path(p).name} ({size} bytes)" for p, size in files)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --- the plan ------------------------------------------------------------------------------------


def open_plan(job: JobConfig, rows: Rows, ckpt: Checkpoint, restart: bool, fresh=None) -> StoredPlan:
    """The stored plan, or `fresh` (make_plan's result) stored now if there is none.

    Many shards may start at once: the plan lock lets the first store its plan; the others find it."""
    settings_fp = settings_fingerprint(job)
    input_fp = input_fingerprint(rows)
    with ckpt.plan_lock():
        stored = ckpt.load_plan()
        if stored and restart:
            ckpt.clear()
            stored = None
        if stored:
            changes = plan_changes(stored.manifest, input_fp, settings_fp)
            if changes:
                raise JobError(
                    f"{job.source}: the input or settings changed since this run's plan was made "
                    f"({ckpt.dir}): " + "; ".join(changes) + ". Run with --restart to start over."
                )
            return stored
        if fresh is None:
            fresh = make_plan(job, rows, *load_tokenizer(job.model, job.source))
        manifest, plan_rows, settled = fresh
        manifest.update(input=input_fp, settings=settings_fp)
        ckpt.store_plan(manifest, plan_rows, settled)
        return ckpt.load_plan()


def make_plan(job: JobConfig, rows: Rows, tokenizer, context: int):
    """Render and tokenize every prompt; settle the rows that cannot run; pack the rest in batches."""
    g, where = job.generation, job.source
    limit = context - g.max_new_tokens
    if limit < 1:
        raise JobError(f"{where}: generation.max_new_tokens: {g.max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens")
    key = row_settings_key(job)
    reusable = load_reusable(job)
    planned: list[tuple[int, int, str | None, str | None]] = []  # row, prompt tokens, truncated prompt, note
    settled: list[tuple[int, Completion, str]] = []
    for start, prompts in rows.slices():
        todo = []
        for offset, p in enumerate(prompts):
            r = start + offset
            if isinstance(p, ValueError):
                settled.append((r, _error(f"bad_input: {p}"), ""))
                continue
            fp = row_fingerprint(key, rows.ids[r], p)
            if fp in reusable:
                settled.append((r, reusable[fp], fp))
            else:
                todo.append((r, p, fp))
        lengths = [len(t) for t in tokenizer([p for _, p, _ in todo], add_special_tokens=True)["input_ids"]] if todo else []
        for (r, p, fp), n in zip(todo, lengths):
            if n <= limit:
                planned.append((r, n, None, None))
            elif job.input.too_long == "truncate":
                cut = truncate_prompt(rows, r, tokenizer, limit)
                if isinstance(cut, str):
                    settled.append((r, _error(f"too_long: {cut}"), fp))
                else:
                    planned.append((r, cut[1], cut[0], f"truncated: {cut[2]}"))
            else:
                settled.append((r, _error(f"too_long: the prompt has {n} tokens; at most {limit} fit (context {context} - max_new_tokens {g.max_new_tokens})"), fp))
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
        }
    )
    settled_table = results_table([r for r, _, _ in settled], -1, [c for _, c, _ in settled], [fp for _, _, fp in settled])
    manifest = {
        "format": 1,
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


def _error(message: str) -> Completion:
    return Completion(None, "error", 0, 0, message)


def load_reusable(job: JobConfig) -> dict[str, Completion]:
    """Successful rows of earlier outputs (input.reuse), by row fingerprint."""
    if not job.input.reuse:
        return {}
    out = Path(job.output.path).resolve()
    found: dict[str, Completion] = {}
    for path in sorted(glob.glob(job.input.reuse)):
        if Path(path).resolve() == out:
            continue
        cols = ["row_fingerprint", "finish_reason", "prompt_tokens", "completion_tokens"]
        try:
            schema = pq.read_schema(path)
            response = json.loads(schema.metadata[b"komt_batch"])["response_column"] if b"komt_batch" in (schema.metadata or {}) else "response"
            t = pq.read_table(path, columns=[*cols, response])
        except (OSError, KeyError, ValueError, pa.ArrowException) as e:
            raise JobError(f"{job.source}: input.reuse: {path} is not a readable komt-batch output ({e})") from None
        for fp, reason, pt, ct, resp in zip(*(t.column(c).to_pylist() for c in [*cols, response])):
            if reason != "error" and fp:
                found.setdefault(fp, Completion(resp, reason, pt, ct))
    return found


# --- running -------------------------------------------------------------------------------------


class StopFlag:
    """SIGTERM, SIGUSR1, SIGINT: start no new batch, finish the rows in flight, commit, exit 75. A second SIGINT: stop now."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        print(
            f"\nkomt-batch: got {signal.Signals(signum).name}: no new batch starts; finishing the rows in flight, then checkpointing "
            "(press Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @contextlib.contextmanager
    def installed(self):
        old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


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
                cleanup(ckpt)
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
    generator = SafeGenerator(engine, job.batching.max_batch_size, job.batching.max_batch_tokens, job.generation.max_new_tokens)
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


def cleanup(ckpt: Checkpoint) -> None:
    for p in ckpt.dir.iterdir():
        p.unlink()
    ckpt.dir.rmdir()


# --- status and merge ----------------------------------------------------------------------------


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
        cleanup(ckpt)
    return summary




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
