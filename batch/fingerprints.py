"""What a plan and a row's output depend on, as fingerprints: a stored plan is resumed only if they
still match, and a row of an earlier output is reused only if its fingerprint does."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from batch.config import JobConfig
from batch.rows import Rows


def settings_fingerprint(job: JobConfig) -> dict:
    """Every setting that changes the plan or the outputs; a change refuses a resume."""
    d = job.as_dict()
    return {
        "model": {k: d["model"][k] for k in ("base", "adapter", "quantization", "compute_dtype")},
        "prompt": d["prompt"],
        "generation": d["generation"],
        "batching": {k: d["batching"][k] for k in ("max_batch_size", "max_batch_tokens")},
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
