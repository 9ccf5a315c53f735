"""What a plan and a row's output depend on, as fingerprints: a stored plan is resumed only if they
still match, a finished output is left alone only if they do, and a row of an earlier output is
reused only if its fingerprint does.

The settings include the contents of the model's and the adapter's files, not only their paths:
new weights at the same path change every row's fingerprint; the input's fingerprint includes its
files' contents (every column). Hashing stays cheap:
- a local directory: the sha256 of the files that loading reads (the weights -- safetensors, else
  .bin -- plus config, tokenizer and code files), each cached by (path, size, mtime_ns) in
  $XDG_CACHE_HOME/komt-batch/file-hashes.json (default ~/.cache), never in the model's directory; a
  file that resolves into a Hugging Face cache's blobs/ is named by its hash already;
- a hub id: the commit of the revision its snapshot comes from (a commit fixes every file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from batch.config import JobConfig, ModelConfig
from batch.errors import JobError
from batch.rows import Rows

WEIGHT_SUFFIXES = (".safetensors", ".bin")  # what transformers and peft load, safetensors first
DEFINING_SUFFIXES = (".json", ".model", ".txt", ".py", ".tiktoken")  # config, tokenizer, remote code
HUB_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # blob names: git sha1, or sha256 for LFS files
# generation settings added after plans were first stored: absent from the fingerprint at their
# defaults (older plans and outputs stay valid), present when set (they change the outputs)
LATER_GENERATION = {"stop_token_ids": [], "min_new_tokens": 0, "repetition_penalty": 1.0, "include_stop_str_in_output": False}
SAMPLING_ONLY = {f"generation.{k}" for k in ("temperature", "top_p", "top_k", "seed")}  # (greedy: no effect)
FRESH_NS = 2_000_000_000  # a file changed this recently may change again within its mtime's tick: not cached


def settings_fingerprint(job: JobConfig) -> dict:
    """Every setting that changes the plan or the outputs, with the model's files; a change refuses a resume."""
    d = job.as_dict()
    model = {k: d["model"][k] for k in ("base", "adapter", "quantization", "compute_dtype")}
    if job.model.merge_adapter:  # other rounding, other outputs (absent when off: older plans stay valid)
        model["merge_adapter"] = True
    model.update(model_files_fingerprint(job.model, job.source))
    return {
        "model": model,
        "prompt": d["prompt"],
        "generation": {k: v for k, v in d["generation"].items() if k not in LATER_GENERATION or v != LATER_GENERATION[k]},
        "batching": {k: d["batching"][k] for k in ("max_batch_size", "max_batch_tokens")},
        "input": {k: d["input"][k] for k in ("id_column", "too_long")},
        "checkpoint": {"every_rows": d["checkpoint"]["every_rows"]},
    }


def row_settings_key(settings: dict) -> str:
    """The settings that decide a row's output (batching aside): part of each row's fingerprint."""
    return json.dumps([settings["model"], settings["prompt"], settings["generation"]], sort_keys=True)


def row_fingerprint(settings_key: str, row_id: str, prompt: str) -> str:
    return hashlib.sha256(f"{settings_key}\x00{row_id}\x00{prompt}".encode()).hexdigest()[:32]


def input_fingerprint(rows: Rows) -> dict:
    h = hashlib.sha256()
    for start, prompts in rows.slices():
        for row_id, p in zip(rows.ids[start : start + len(prompts)], prompts):
            h.update(f"{row_id}\x00{p}\x01".encode())
    files = [[str(f.resolve()), f.stat().st_size] for f in rows.files]
    # every byte of every file too, not only the ids and prompts: the output carries all the input's
    # columns, so an edited label must not leave a finished output "done" (hashes cached by path, size, mtime)
    return {"files": files, "rows": rows.table.num_rows, "content": h.hexdigest(), "file_hashes": file_hashes(rows.files)}


# --- the model's files ---------------------------------------------------------------------------


def model_files_fingerprint(cfg: ModelConfig, where: str) -> dict:
    return {
        "base_files": files_fingerprint(cfg.base, where, "model.base"),
        "adapter_files": files_fingerprint(cfg.adapter, where, "model.adapter") if cfg.adapter else None,
    }


def files_fingerprint(name: str, where: str, key: str) -> str:
    """`sha256:<digest of the used files' names and hashes>` for a directory, `hub:<commit>` for a hub id."""
    local = Path(name).expanduser()
    if local.is_dir():
        files = used_files(local)
        h = hashlib.sha256()
        for f, digest in zip(files, file_hashes(files)):
            h.update(f"{f.name}\x00{digest}\n".encode())
        return "sha256:" + h.hexdigest()[:32]
    return "hub:" + hub_commit(name, where, key)


def used_files(directory: Path) -> list[Path]:
    """The files of a model directory that loading reads (subdirectories, e.g. original/, are not)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    for suffix in WEIGHT_SUFFIXES:
        weights = [f for f in files if f.suffix == suffix]
        if weights:
            break
    return [f for f in files if f.suffix in DEFINING_SUFFIXES] + weights


def hub_commit(repo_id: str, where: str, key: str) -> str:
    """The commit of the snapshot a hub id loads from (online: main's now; offline: the cache's)."""
    from huggingface_hub import snapshot_download

    try:  # only the small JSON files, which loading fetches anyway; offline this reads the cache
        return Path(snapshot_download(repo_id, allow_patterns=["*.json"])).name
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise JobError(f"{where}: {key}: {repo_id}: not a local directory, and no revision of it found on the Hugging Face Hub or in its cache ({first})") from None


def file_hashes(files: list[Path]) -> list[str]:
    """sha256 of each file, read only when the cache has no entry for its path, size and mtime."""
    cache = _read_cache()
    out, new = [], {}
    for f in files:
        real = f.resolve()
        if real.parent.name == "blobs" and HUB_BLOB.fullmatch(real.name):
            out.append(real.name)  # the Hugging Face cache names a file by its hash
            continue
        st = real.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        hit = cache.get(str(real))
        if hit and hit[:2] == stamp:
            out.append(hit[2])
            continue
        digest = _sha256(real)
        out.append(digest)
        if time.time_ns() - st.st_mtime_ns > FRESH_NS:
            new[str(real)] = [*stamp, digest]
    if new:
        _write_cache({**_read_cache(), **new})  # re-read: other processes (shards) may have added entries
    return out


def hash_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "komt-batch" / "file-hashes.json"


def _read_cache() -> dict:
    try:
        cache = json.loads(hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(cache: dict) -> None:
    """Best effort: a cache that cannot be written only costs hashing again next time."""
    path = hash_cache_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 23):
            h.update(block)
    return h.hexdigest()


# --- what changed ----------------------------------------------------------------------------------


def plan_changes(stored: dict, input_fp: dict, settings_fp: dict) -> list[str]:
    """What differs between a stored plan (or a finished output's record) and the input and settings now, in words."""
    changes = []
    old_in = stored["input"]
    if old_in["files"] != input_fp["files"]:
        changes.append(f"input files: {_files(old_in['files'])} -> {_files(input_fp['files'])}")
    if old_in["rows"] != input_fp["rows"]:
        changes.append(f"input rows: {old_in['rows']} -> {input_fp['rows']}")
    elif old_in["content"] != input_fp["content"]:
        changes.append("input content: the ids or prompts changed")
    elif "file_hashes" in old_in and old_in["file_hashes"] != input_fp["file_hashes"]:  # (plans before 2026-11-28 have none)
        edited = [Path(f).name for (f, _), a, b in zip(input_fp["files"], old_in["file_hashes"], input_fp["file_hashes"]) if a != b]
        changes.append(f"input content: {', '.join(edited) or 'the files'} changed (other columns than the ids and prompts)")
    defaults = {f"generation.{k}": v for k, v in LATER_GENERATION.items()}  # (absent: at its default)
    old, new = {**defaults, **_flatten(stored["settings"])}, {**defaults, **_flatten(settings_fp)}
    greedy = old.get("generation.do_sample") is False and new.get("generation.do_sample") is False
    for key in sorted(set(old) | set(new)):
        if greedy and key in SAMPLING_ONLY:
            continue  # greedy decoding takes the argmax of the raw logits: these change no output
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
