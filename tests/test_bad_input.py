"""Every kind of bad input: one clear line, exit code 2, nothing written; bad rows become error rows."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from batch import engine as engine_module
from batch.cli import main
from tests.conftest import ROOT, TINY, cli_env, komt, make_job, read_output, seed_rows, write_jsonl

GOOD = [{"id": s["id"], "instruction": s["instruction"]} for s in seed_rows()[:3]]


def setup_case(tmp_path, case):
    """Lay out the files of one bad case; returns (job path, extra CLI args)."""
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    sections, args = {}, []
    kind, value = case
    if kind == "input_file":  # bytes of the JSONL input
        src.write_bytes(value)
    elif kind == "input_path":
        sections["input"] = {"path": str(tmp_path / value)}
    elif kind == "parquet_bytes":
        pq.write_table(pa.table({"id": ["a"] * 50, "instruction": ["q"] * 50}), tmp_path / "in.parquet")
        data = (tmp_path / "in.parquet").read_bytes()
        (tmp_path / "in.parquet").write_bytes(value(data))
        sections["input"] = {"path": str(tmp_path / "in.parquet")}
    elif kind == "two_files":
        d = tmp_path / "dir"
        write_jsonl(d / "a.jsonl", GOOD)
        write_jsonl(d / "b.jsonl", value)
        sections["input"] = {"path": str(d)}
    elif kind == "sections":
        sections = value(tmp_path)
    elif kind == "args":
        args = value
    job = make_job(tmp_path, src, **sections)
    if kind == "job_text":
        job.write_text(value(job.read_text()))
    return job, args


def mismatched_adapter(tmp_path):
    """A LoRA adapter made for a Llama of another width: it must be refused before loading."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "other-adapter")
    return {"model": {"adapter": str(tmp_path / "other-adapter")}}


def broken_model(part: str, damage: str):
    """A copy of the tiny model's base or adapter folder, damaged: what loading would fail on only
    after the plan is stored (run) or not at all (validate), so it must be refused before."""
    import shutil

    def sections(tmp_path):
        folder = tmp_path / f"broken-{part}"
        shutil.copytree(TINY / part, folder)
        if damage == "empty":
            shutil.rmtree(folder)
            folder.mkdir()
        elif damage == "no weights":
            for f in folder.glob("*.safetensors"):
                f.unlink()
        elif damage == "truncated":
            data = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").write_bytes(data[:100])
        elif damage == "index of a missing file":
            (folder / "model.safetensors").unlink()
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
        elif damage == "the base":
            shutil.rmtree(folder)
            shutil.copytree(TINY / "base", folder)
        return {"model": {part: str(folder)}}

    return sections


def output_is_the_input(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "instruction": ["q"]}), tmp_path / "in.parquet")
    return {"input": {"path": str(tmp_path / "in.parquet")}, "output": {"path": str(tmp_path / "in.parquet")}}


def not_writable_output(tmp_path):
    (tmp_path / "a-file").write_text("x")
    return {"output": {"path": str(tmp_path / "a-file" / "out.parquet")}}


CASES = {
    "missing input": (("input_path", "nope.jsonl"), "input.path: " , "no such file"),
    "empty glob": (("input_path", "*.parquet"), "input.path", "matches no .jsonl, .jsonl.gz or .parquet file"),
    "truncated parquet": (("parquet_bytes", lambda d: d[: len(d) // 2]), "in.parquet", "not a readable Parquet file"),
    "garbage parquet": (("parquet_bytes", lambda d: b"PAR1" + b"\0" * 100), "in.parquet", "not a readable Parquet file"),
    "jsonl not json": (("input_file", b'{"id": "a", "instruction": "q"}\n{"id": "b", \n'), "in.jsonl:2", "not valid JSON"),
    "invalid utf-8": (("input_file", b'{"id": "a", "instruction": "\xed\xa0\x80"}\n'), "in.jsonl:1", "invalid UTF-8"),
    "jsonl not object": (("input_file", b'{"id": "a", "instruction": "q"}\n"just a string"\n'), "in.jsonl:2", "expected a JSON object"),
    "mixed types": (("input_file", b'{"id": "a", "instruction": "q"}\n{"id": "b", "instruction": {"x": 1}}\n'), "in.jsonl:2", "column 'instruction': objects where earlier values are strings"),
    "column types disagree": (("two_files", [{"id": 7, "instruction": "q"}]), "b.jsonl", "column 'id' is int64 here but string in"),
    "missing template column": (("args", ["prompt.template=Q: {question}"]), "job.yaml", "column 'question' is not in the input"),
    "bad placeholder": (("args", ["prompt.template=Q: {instruction"]), "prompt.template", "bad placeholder"),
    "positional placeholder": (("args", ["prompt.template=Q: {0}"]), "prompt.template", "bad placeholder {0}"),
    "yaml syntax": (("job_text", lambda t: t + "generation: [unclosed\n"), "job.yaml", "YAML syntax error at line"),
    "unknown key": (("args", ["generation.temprature=0.5"]), "job.yaml", "did you mean generation.temperature?"),
    "wrong type": (("args", ["batching.max_batch_size=many"]), "batching.max_batch_size", "expected an integer"),
    "negative max_new_tokens": (("args", ["generation.max_new_tokens=-3"]), "generation.max_new_tokens", "must be >= 1"),
    "top_p above 1": (("args", ["generation.top_p=1.2"]), "generation.top_p", "(0, 1]"),
    "max_batch_tokens too small": (("args", ["batching.max_batch_tokens=20"]), "batching.max_batch_tokens", "too small for one row"),
    "output is an input": (("sections", output_is_the_input), "output.path", "is also the input file"),
    "output is the JSONL input": (("sections", lambda t: {"output": {"path": str(t / "in.jsonl")}}), "output.path", "is also the input file"),
    "output named as JSONL": (("sections", lambda t: {"output": {"path": str(t / "out" / "answers.jsonl")}}), "output.path", "answers.jsonl: the output is a Parquet file, not .jsonl; name it .parquet"),
    "output named as CSV": (("args", ["output.path=out/x.CSV"]), "output.path", "out/x.CSV: the output is a Parquet file, not .csv; name it .parquet"),
    "output not writable": (("sections", not_writable_output), "output.path", "cannot write under"),
    "missing model": (("args", ["model.base=/nonexistent/model"]), "model.base", "no such directory"),
    "missing adapter": (("args", ["model.adapter=./no-adapter-here"]), "model.adapter", "no such directory"),
    "adapter for another base": (("sections", mismatched_adapter), "model.adapter", "does not fit model.base"),
    "adapter folder empty": (("sections", broken_model("adapter", "empty")), "model.adapter", ": cannot load "),
    "adapter folder is the base's": (("sections", broken_model("adapter", "the base")), "model.adapter", ": cannot load "),
    "adapter without weights": (("sections", broken_model("adapter", "no weights")), "model.adapter", "holds no adapter weights (adapter_model.safetensors, adapter_model.bin)"),
    "base without weights": (("sections", broken_model("base", "no weights")), "model.base", "holds no weights (model.safetensors, "),
    "base weights truncated": (("sections", broken_model("base", "truncated")), "model.base", "model.safetensors: not a readable safetensors file"),
    "base index of a missing file": (("sections", broken_model("base", "index of a missing file")), "model.base", "model.safetensors.index.json names weights files that are not in"),
    "duplicate ids": (("input_file", b'{"id": "a", "instruction": "q"}\n{"id": "a", "instruction": "r"}\n'), "input.id_column", "duplicate ids in the input (1), e.g. 'a'; 'a' is at "),
    "missing id column": (("args", ["input.id_column=key"]), "input.id_column", "'key' is not in the input (columns: id, instruction)"),
    "response column clash": (("args", ["output.response_column=instruction"]), "output.response_column", "already has a column 'instruction'"),
    "unknown section": (("args", ["nosuch.key=1"]), "job.yaml", "unknown key nosuch; valid keys"),
    "bad quantization": (("args", ["model.quantization=fp8"]), "model.quantization", "must be one of nf4, int8, none"),
    "bad override": (("args", ["generation"]), "override", "expected dotted.key=value"),
    "temperature not a number": (("args", ["generation.temperature=.nan"]), "generation.temperature", "must be a number > 0"),
    "a GPU that is not there": (("args", ["model.device_map=cuda:7"]), "model.device_map: cuda:7", "torch sees"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, name):
    case, where, fragment = CASES[name]
    job, args = setup_case(tmp_path, case)
    out = tmp_path / "out" / "result.parquet"
    out.parent.mkdir()
    out.write_bytes(b"an earlier output")  # must survive untouched
    code = main(["run", str(job), "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("komt-batch: error: ")
    assert where in err[0] and fragment in err[0], err[0]
    if case[0] == "args" and "=" in args[-1]:  # found in the job file or later (the input, the model): the override is named
        assert err[0].endswith(f" (set on the command line: {args[-1]})"), err[0]
    else:
        assert "set on the command line" not in err[0], err[0]
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.parquet"]
    assert out.read_bytes() == b"an earlier output"


def test_a_model_refused_while_loading_leaves_no_checkpoint(tmp_path, capsys, monkeypatch):
    """What loading alone finds (after the plan is stored): the run's own plan is removed, so the job,
    mended, runs as new, with no --restart."""
    from batch.errors import JobError

    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    job = make_job(tmp_path, src, generation={"max_new_tokens": 4})
    out = tmp_path / "out" / "result.parquet"
    out.parent.mkdir()
    (out.parent / "notes.txt").write_text("the user's")

    def refuse(*args, **kwargs):
        raise JobError(f"{job}: model.adapter: cannot load it (as loading alone finds)")

    monkeypatch.setattr(engine_module.Engine, "load", refuse)
    assert main(["run", str(job), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith("model.adapter: cannot load it (as loading alone finds)")
    assert sorted(p.name for p in out.parent.iterdir()) == ["notes.txt"]  # (the plan it stored: gone)
    monkeypatch.undo()
    assert main(["run", str(job), "--no-progress"]) == 0
    assert len(read_output(out)) == len(GOOD)


def test_a_model_refused_while_loading_keeps_a_checkpoint_with_rows(tmp_path, capsys, monkeypatch):
    """A resumed run's checkpoint (rows committed before) is kept when loading refuses the model, and
    so is the plan a --restart stored (it is what lets the next run replace the output)."""
    from batch.errors import JobError

    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    job = make_job(tmp_path, src, generation={"max_new_tokens": 4}, batching={"max_batch_size": 1}, checkpoint={"every_rows": 1, "keep": True})
    out = tmp_path / "out" / "result.parquet"
    assert main(["run", str(job), "--no-progress"]) == 0
    ckpt = tmp_path / "out" / "result.parquet.parts"
    out.unlink()
    sorted(ckpt.glob("part-*.parquet"))[0].unlink()  # one row to redo: the run resumes, and loads the model
    kept = sorted(p.name for p in ckpt.iterdir())

    def refuse(*args, **kwargs):
        raise JobError(f"{job}: model.adapter: cannot load it (as loading alone finds)")

    monkeypatch.setattr(engine_module.Engine, "load", refuse)
    assert main(["run", str(job), "--no-progress"]) == 2
    assert sorted(p.name for p in ckpt.iterdir()) == kept
    assert main(["run", str(job), "--no-progress", "--restart"]) == 2  # (its own plan: kept too)
    assert (ckpt / "manifest.json").exists()
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["run", str(job), "--no-progress"]) == 0
    assert "generated_rows            3" in capsys.readouterr().out and len(read_output(out)) == len(GOOD)


def test_a_real_process_prints_no_traceback(tmp_path):
    job = make_job(tmp_path, tmp_path / "missing.jsonl")
    p = subprocess.run([sys.executable, "-m", "batch", "run", str(job)], capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"komt-batch: error: {job}: input.path: {tmp_path / 'missing.jsonl'}: no such file"


@pytest.mark.parametrize("base, said", [
    ("no-such-org-komt/no-model", "not a local directory, and not found as a Hugging Face Hub id: "),
    # `org/name` whose first part is a folder in the current directory: more likely a local path mistyped
    ("models/no-model", "no such directory (./models is a folder here), and not found as a Hugging Face Hub id: "),
])
def test_a_hub_id_not_in_the_cache_is_one_line_offline(tmp_path, base, said):
    """(a real process: huggingface_hub reads HF_HUB_OFFLINE when it is imported)"""
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    job = make_job(tmp_path, src)
    (tmp_path / "models").mkdir()
    p = subprocess.run([sys.executable, "-m", "batch", "validate", str(job), f"model.base={base}"],
                       capture_output=True, text=True, cwd=tmp_path, env=cli_env())
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"komt-batch: error: {job}: model.base: {base}: {said}"), p.stderr
    assert p.stderr.strip().endswith(f"(set on the command line: model.base={base})")


def test_empty_input_gives_an_empty_file_with_the_schema(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("")
    job = make_job(tmp_path, src)
    assert main(["run", str(job), "--no-progress"]) == 0
    t = pq.read_table(tmp_path / "out" / "result.parquet")
    assert t.num_rows == 0
    assert t.column_names == ["instruction", "id", "response", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens", "error", "row_fingerprint"]


def test_bad_rows_become_error_rows(tmp_path, capsys):
    rows = [
        {"id": "ok", "instruction": seed_rows()[0]["instruction"]},
        {"id": "null", "instruction": None},
        {"id": "empty", "instruction": "   "},
        {"id": "long", "instruction": "아주 긴 질문 " * 400},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    job = make_job(tmp_path, src, generation={"max_new_tokens": 16})
    assert main(["run", str(job), "--no-progress"]) == 0
    got = {r["id"]: r for r in read_output(tmp_path / "out" / "result.parquet")}
    assert [r["id"] for r in read_output(tmp_path / "out" / "result.parquet")] == [r["id"] for r in rows]
    assert got["ok"]["finish_reason"] == "length" and got["ok"]["error"] is None
    for rid, fragment in [("null", "is null"), ("empty", "is empty"), ("long", "too_long: the prompt has")]:
        assert got[rid]["finish_reason"] == "error" and got[rid]["response"] is None
        assert fragment in got[rid]["error"]
    assert "at most 2032 fit (context 2048 - max_new_tokens 16)" in got["long"]["error"]
    summary = json.loads((tmp_path / "out" / "result.summary.json").read_text())
    assert summary["errors_by_cause"] == {"bad_input": 2, "too_long": 1}
    out = capsys.readouterr().out
    assert '"bad_input": 2' in out


def test_non_string_field_is_an_error_row(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["a", "b"], "instruction": ["질문", "질문"], "n": [1, 2]}), tmp_path / "in.parquet")
    job = make_job(tmp_path, tmp_path / "in.parquet", prompt={"template": "### instruction: {instruction} {n}\n\n### Response:"})
    assert main(["run", str(job), "--no-progress"]) == 0
    rows = read_output(tmp_path / "out" / "result.parquet")
    assert [r["error"] for r in rows] == ["bad_input: template field 'n' is int, not a string"] * 2


def test_too_long_truncate_keeps_the_template(tmp_path):
    """(a real process: its log holds no warning of the tokenizer's about the long prompt; the row says what was cut)"""
    rows = [{"id": "long", "instruction": "질문 " * 3000 + "끝"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    job = make_job(tmp_path, src, input={"too_long": "truncate"}, generation={"max_new_tokens": 8})
    done = komt("run", job, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "Token indices sequence length" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    (row,) = read_output(tmp_path / "out" / "result.parquet")
    assert row["finish_reason"] == "length" and row["completion_tokens"] == 8
    assert row["prompt_tokens"] <= 2048 - 8 and row["prompt_tokens"] > 1900
    assert row["error"].startswith("truncated: field 'instruction' cut from")


def test_too_long_truncate_cuts_a_field_the_template_uses_twice(tmp_path, capsys):
    """Each token cut from the field shortens the prompt twice: the cut still stops near the limit."""
    rows = [{"id": "long", "instruction": "질문 " * 3000 + "끝"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    job = make_job(tmp_path, src, input={"too_long": "truncate"}, generation={"max_new_tokens": 8},
                   prompt={"template": "### instruction: {instruction}\n\n(again: {instruction})\n\n### Response:"})
    assert main(["run", str(job), "--no-progress"]) == 0
    (row,) = read_output(tmp_path / "out" / "result.parquet")
    assert row["error"].startswith("truncated: field 'instruction' cut from") and row["completion_tokens"] == 8
    assert 1900 < row["prompt_tokens"] <= 2048 - 8


def test_too_long_truncate_cuts_the_field_with_the_most_tokens_not_characters(tmp_path):
    """A field of few characters and many tokens (emoji: several tokens each) beside one of many
    characters and fewer tokens: the one with the most tokens is cut, and the row is answered."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-komt" / "base")
    row = {"id": "z", "instruction": "협력공인중개사는 " * 300, "input": "😀" * 600}
    count = {k: len(tok(row[k], add_special_tokens=False)["input_ids"]) for k in ("instruction", "input")}
    assert len(row["instruction"]) > len(row["input"]) and count["input"] > count["instruction"]  # (the case itself)
    src = write_jsonl(tmp_path / "in.jsonl", [row])
    job = make_job(tmp_path, src, input={"too_long": "truncate"}, generation={"max_new_tokens": 8},
                   prompt={"template": "### instruction: {instruction}\n\n### input: {input}\n\n### Response:"})
    assert main(["run", str(job), "--no-progress"]) == 0
    (out,) = read_output(tmp_path / "out" / "result.parquet")
    assert out["error"].startswith(f"truncated: field 'input' cut from {count['input']} to "), out["error"]
    assert out["finish_reason"] == "length" and 2048 - 8 - 40 < out["prompt_tokens"] <= 2048 - 8


def inject(monkeypatch, fail):
    """Make the engine raise `fail(prompts)` (an exception or None) when rows join the batch."""
    original = engine_module.Engine._join
    calls = []

    def join(self, batch, joining, *args):
        prompts = [r.ids for r in joining]
        calls.append(len(prompts))
        error = fail(prompts)
        if error is not None:
            raise error
        return original(self, batch, joining, *args)

    monkeypatch.setattr(engine_module.Engine, "_join", join)
    return calls


def many(n):
    seeds = seed_rows()
    return [{"id": f"r{i}", "instruction": seeds[i % 9]["instruction"] + " 더" * i} for i in range(n)]


def run_rows(tmp_path, name, rows, **sections):
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    job = make_job(tmp_path, src, f"{name}.yaml", output={"path": str(tmp_path / f"{name}.parquet")}, **sections)
    assert main(["run", str(job), "--no-progress"]) == 0
    return read_output(tmp_path / f"{name}.parquet")


def test_out_of_memory_splits_and_matches_an_unsplit_run(tmp_path, monkeypatch, capsys):
    rows = many(8)
    opts = dict(generation={"max_new_tokens": 12}, batching={"max_batch_size": 8, "max_batch_tokens": 100000}, checkpoint={"every_rows": 8})
    reference = run_rows(tmp_path, "ref", rows, **opts)
    budget = 3 * (max(len(r["instruction"]) for r in rows) + 40 + 12)

    def oom(prompts):
        cost = len(prompts) * (max(map(len, prompts)) + 12)
        return RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB") if cost > budget else None

    calls = inject(monkeypatch, oom)
    got = run_rows(tmp_path, "oom", rows, **opts)
    assert got == [dict(r, **{}) for r in reference] or [r["response"] for r in got] == [r["response"] for r in reference]
    assert [r["response"] for r in got] == [r["response"] for r in reference]
    assert calls[0] == 8 and max(calls[1:]) < 8  # it split, and later calls stay under the lowered budget
    summary = json.loads((tmp_path / "oom.summary.json").read_text())
    assert summary["oom_splits"] >= 1 and summary["lowered_max_batch_tokens"] is not None
    assert "out of memory on 8 rows" in capsys.readouterr().err


def test_out_of_memory_for_a_single_row_is_an_error_row(tmp_path, monkeypatch, capsys):
    rows = many(4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY / "base")
    longest = max(len(tok(f"### instruction: {r['instruction']}\n\n### Response:")["input_ids"]) for r in rows)
    inject(monkeypatch, lambda prompts: torch.cuda.OutOfMemoryError("CUDA out of memory") if max(map(len, prompts)) >= longest else None)
    got = run_rows(tmp_path, "oom1", rows, generation={"max_new_tokens": 4})
    assert [r["finish_reason"] for r in got] == ["length", "length", "length", "error"]
    assert got[3]["error"] == f"oom: out of memory even alone ({longest} prompt tokens)"


def test_a_failing_row_does_not_take_its_batch_down(tmp_path, monkeypatch, capsys):
    rows = many(6)
    rows[3]["instruction"] = "BOOM " + rows[3]["instruction"]
    bad_ids = None

    def fail(prompts):
        text = [engine_module.Engine.decode(None, p) if False else p for p in prompts]
        return ValueError("kernel exploded") if any(p == bad_ids for p in text) else None

    # find the BOOM row's token ids with the real tokenizer, then fail any batch that holds it
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY / "base")
    bad_ids = tok(f"### instruction: {rows[3]['instruction']}\n\n### Response:")["input_ids"]
    inject(monkeypatch, fail)
    got = run_rows(tmp_path, "fail", rows, generation={"max_new_tokens": 4}, batching={"max_batch_size": 6})
    assert [r["finish_reason"] for r in got].count("error") == 1
    assert got[3]["error"] == "generation: ValueError: kernel exploded"
    assert all(r["response"] for i, r in enumerate(got) if i != 3)


def test_a_failure_while_rows_finish_loses_no_row(tmp_path, monkeypatch, capsys):
    """Rows that finished in the step that failed are redone, not dropped."""
    rows = many(6)
    opts = dict(generation={"max_new_tokens": 6}, batching={"max_batch_size": 6})
    reference = run_rows(tmp_path, "ref", rows, **opts)
    original, calls = engine_module.Engine.finish, []

    def finish(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("decoder hiccup")
        return original(self, *args)

    monkeypatch.setattr(engine_module.Engine, "finish", finish)
    got = run_rows(tmp_path, "hiccup", rows, **opts)
    assert got == reference and len(got) == 6


def test_a_failed_batch_frees_its_cache_before_the_rows_are_redone(tmp_path, monkeypatch, capsys):
    import weakref

    from batch import kv_cache

    caches, alive_at_redo = [], []
    init = kv_cache.SlotCache.__init__
    monkeypatch.setattr(kv_cache.SlotCache, "__init__", lambda self, *a: (caches.append(weakref.ref(self)), init(self, *a))[1])
    recover = engine_module.SafeGenerator._recover

    def spy(self, e, prompts, seeds):
        alive_at_redo.append(sum(ref() is not None for ref in caches))
        return recover(self, e, prompts, seeds)

    monkeypatch.setattr(engine_module.SafeGenerator, "_recover", spy)
    joins = inject(monkeypatch, lambda prompts: RuntimeError("CUDA out of memory") if len(joins) == 2 else None)
    rows = many(8)
    got = run_rows(tmp_path, "freed", rows, generation={"max_new_tokens": 12}, batching={"max_batch_size": 4})
    assert len(got) == 8 and all(r["response"] is not None for r in got)
    assert alive_at_redo and alive_at_redo[0] == 0  # the failed stream's cache was already gone
