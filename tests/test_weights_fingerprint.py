"""What decides a row's output is in its fingerprint: the contents of the model's and the adapter's
files, hashed cheaply (a cache by path, size and mtime outside the model's directory; a Hugging Face
cache's blob names; a hub snapshot's commit). New weights at the same path are never reused, and a
resume across them is refused."""

import json
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

from batch.cli import main
from batch.errors import JobError
from batch.fingerprints import files_fingerprint, hash_cache_path
from tests.conftest import TINY, make_job, seed_rows, write_jsonl

OLD = 1_600_000_000  # an mtime well in the past: the hash of such a file is cached


def copy_adapter(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(TINY / "adapter", adapter)
    for f in adapter.iterdir():
        os.utime(f, (OLD, OLD))
    return adapter


def scale_lora_b(adapter, factor: float) -> None:
    """New adapter weights at the same path (as after retraining): every lora_B scaled."""
    path = adapter / "adapter_model.safetensors"
    tensors = {k: v * factor if "lora_B" in k else v for k, v in load_file(path).items()}
    save_file(tensors, path)


def test_the_fingerprint_follows_the_files_and_is_cached_beside_them_never_in_them(tmp_path):
    adapter = copy_adapter(tmp_path)
    listing = sorted(p.name for p in adapter.iterdir())
    first = files_fingerprint(str(adapter), "job.yaml", "model.adapter")
    assert first.startswith("sha256:") and files_fingerprint(str(adapter), "job.yaml", "model.adapter") == first
    cache = json.loads(hash_cache_path().read_text())
    assert str((adapter / "adapter_model.safetensors").resolve()) in cache
    assert hash_cache_path().parents[1] == Path(os.environ["XDG_CACHE_HOME"]) and sorted(p.name for p in adapter.iterdir()) == listing
    # same size and mtime: the cached hash is used, the file is not read (proof: other bytes, same hash)
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, (OLD, OLD))
    assert files_fingerprint(str(adapter), "job.yaml", "model.adapter") == first
    os.utime(weights, (OLD + 1, OLD + 1))  # a new mtime: read again
    assert files_fingerprint(str(adapter), "job.yaml", "model.adapter") != first
    # a file changed within the last seconds is hashed every time (its mtime may not move on a rewrite)
    scale_lora_b(adapter, 2.0)
    second = files_fingerprint(str(adapter), "job.yaml", "model.adapter")
    entry = json.loads(hash_cache_path().read_text())[str(weights.resolve())]
    assert entry[1] != weights.stat().st_mtime_ns and second != first
    # files that loading does not read do not count; the config does
    (adapter / "README.md").write_text("notes")
    (adapter / "original").mkdir()
    assert files_fingerprint(str(adapter), "job.yaml", "model.adapter") == second
    (adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text() + "\n")
    assert files_fingerprint(str(adapter), "job.yaml", "model.adapter") != second


def test_hugging_face_cache_files_are_named_by_their_hash_and_hub_ids_by_their_commit(tmp_path, monkeypatch):
    # a local directory of links into a hub cache's blobs/: the blob names are the hashes (nothing is read)
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    model = tmp_path / "model"
    model.mkdir()
    for name, digest in [("model.safetensors", "a" * 64), ("config.json", "b" * 40)]:
        (blobs / digest).write_text(name)
        (model / name).symlink_to(blobs / digest)
    first = files_fingerprint(str(model), "job.yaml", "model.base")
    (blobs / ("a" * 64)).write_text("other bytes under the same name")
    assert files_fingerprint(str(model), "job.yaml", "model.base") == first
    # a hub id: the commit of the cached snapshot (offline), which changes when main moves on
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / "models--org--komt"
    for commit in ("1" * 40, "2" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        assert files_fingerprint("org/komt", "job.yaml", "model.base") == f"hub:{commit}"
    with pytest.raises(JobError, match=r"job.yaml: model.adapter: org/missing: not a local directory, and no revision of it found"):
        files_fingerprint("org/missing", "job.yaml", "model.adapter")


def test_new_adapter_weights_at_the_same_path_are_not_reused_and_refuse_a_resume(tmp_path, capsys):
    adapter = copy_adapter(tmp_path)
    seeds = seed_rows()
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": s["id"], "instruction": s["instruction"]} for s in seeds[:4]])
    opts = dict(model={"adapter": str(adapter)}, generation={"max_new_tokens": 12}, checkpoint={"every_rows": 2})
    old = make_job(tmp_path, src, "old.yaml", output={"path": str(tmp_path / "old.parquet")}, **opts)
    again = make_job(tmp_path, src, "again.yaml", input={"reuse": str(tmp_path / "old.parquet")}, checkpoint={"every_rows": 2, "keep": True}, **{k: v for k, v in opts.items() if k != "checkpoint"})
    assert main(["run", str(old), "--no-progress"]) == 0
    assert main(["run", str(again), "--no-progress"]) == 0  # unchanged weights: every row carried over
    assert "reused_rows               4" in capsys.readouterr().out
    (tmp_path / "out" / "result.parquet").unlink()  # (its checkpoint is kept: a resume of it is refused below)
    scale_lora_b(adapter, 3.0)
    assert main(["run", str(old), "--no-progress"]) == 2  # the finished output is not "done" any more
    assert "model.adapter_files: 'sha256:" in capsys.readouterr().err
    assert main(["run", str(again), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the input or settings changed since this run's plan was made" in err and "model.adapter_files" in err
    assert main(["run", str(again), "--no-progress", "--restart"]) == 0
    assert "reused_rows               0" in capsys.readouterr().out  # nothing stale is reused
    assert main(["run", str(old), "--no-progress", "output.path=" + str(tmp_path / "new.parquet")]) == 0
    got = pq.read_table(tmp_path / "out" / "result.parquet")
    assert got.equals(pq.read_table(tmp_path / "new.parquet"))  # = a fresh run with the new weights
    assert got.column("response").to_pylist() != pq.read_table(tmp_path / "old.parquet").column("response").to_pylist()


def test_merging_the_adapter_is_in_every_rows_fingerprint_and_leaves_unmerged_ones_as_they_were(tmp_path):
    from batch.config import load_job
    from batch.fingerprints import row_settings_key, settings_fingerprint

    path = make_job(tmp_path, write_jsonl(tmp_path / "in.jsonl", seed_rows()[:2]))
    unmerged = settings_fingerprint(load_job(path, []))
    merged = settings_fingerprint(load_job(path, ["model.merge_adapter=true"]))
    assert "merge_adapter" not in unmerged["model"]  # the plans and rows of earlier versions stay valid
    assert merged["model"] == {**unmerged["model"], "merge_adapter": True}
    assert row_settings_key(merged) != row_settings_key(unmerged)  # other rounding: never reused for the other


@pytest.mark.parametrize("override, key, value", [
    ("generation.stop_token_ids=[13]", "stop_token_ids", [13]),
    ("generation.min_new_tokens=4", "min_new_tokens", 4),
    ("generation.repetition_penalty=1.2", "repetition_penalty", 1.2),
    ("generation.include_stop_str_in_output=true", "include_stop_str_in_output", True),
])
def test_the_generation_options_are_in_every_rows_fingerprint_when_set(tmp_path, override, key, value):
    """They change the outputs; at their defaults they are absent, so earlier plans and rows stay valid."""
    from batch.config import load_job
    from batch.fingerprints import row_settings_key, settings_fingerprint

    path = make_job(tmp_path, write_jsonl(tmp_path / "in.jsonl", seed_rows()[:2]))
    plain = settings_fingerprint(load_job(path, []))
    changed = settings_fingerprint(load_job(path, [override]))
    assert key not in plain["generation"]
    assert changed["generation"] == {**plain["generation"], key: value}
    assert row_settings_key(changed) != row_settings_key(plain)
