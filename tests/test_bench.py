"""komt-batch bench on tiny settings: every mode and figure is there, greedy outputs agree across
modes, and the job's planner + engine waste less than fixed batches in input order."""

from __future__ import annotations

import json

import pytest

from batch import bench
from batch.errors import JobError

MODE_FIELDS = [
    "label", "rows", "wall_seconds", "generated_tokens", "tokens_per_second", "rows_per_second",
    "prompt_tokens", "padded_prompt_tokens", "prefill_efficiency", "kept_tokens", "row_steps",
    "decode_efficiency", "overhead", "peak_memory_bytes", "completion_lengths", "finish_reasons",
    "vs_single", "vs_fixed", "cpu",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    overrides = [
        "prompts=24", "prompt_median=40", "prompt_max=200", "max_new_tokens=16", "fixed_batch_size=8",
        "max_batch_size=8", "max_batch_tokens=4096", "single_limit=null", "variants=[float32]",
        "vllm_python=null", "quiet_wait=0", f"output={out}", f"model.dir={tmp / 'model'}", "model.hidden_size=64",
        "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128", "model.tune_prompts=16",
    ]
    assert bench.main(str(bench.DEFAULT_JOB), overrides) == 0
    return json.loads(out.read_text())


def test_report_has_every_mode_and_field(report):
    assert report["date"] and report["machine"]["cpu"] and report["machine"]["torch"]
    assert report["prompts"]["count"] == 24
    (variant,) = report["variants"]
    assert variant["variant"] == "float32"
    modes = variant["modes"]
    assert set(modes) == {"single", "fixed", "engine", "vllm"}
    for name in ("single", "fixed", "engine"):
        missing = [f for f in MODE_FIELDS if f not in modes[name]]
        assert not missing, f"{name} lacks {missing}"
        assert modes[name]["tokens_per_second"] > 0 and modes[name]["peak_memory_bytes"] > 0
        assert 0 <= modes[name]["overhead"] < 1
    for name in ("fixed", "engine"):
        assert modes[name]["checked_rows"] == 24
    assert "skipped" in modes["vllm"]  # no vllm_python: mode 4 skipped with a note
    assert set(variant["targets"]) >= {"engine >= 4x single (tok/s)", "engine overhead <= 5%"}


def test_batched_modes_give_the_greedy_responses_of_one_at_a_time(report):
    modes = report["variants"][0]["modes"]
    assert modes["fixed"]["equal_rows"] == 24
    assert modes["engine"]["equal_rows"] == 24
    assert modes["engine"]["generated_tokens"] == modes["single"]["generated_tokens"]


def test_engine_wastes_less_than_fixed_batches(report):
    modes = report["variants"][0]["modes"]
    assert modes["engine"]["decode_efficiency"] > modes["fixed"]["decode_efficiency"]
    assert modes["engine"]["prefill_efficiency"] >= modes["fixed"]["prefill_efficiency"]
    assert modes["single"]["prefill_efficiency"] == 1.0


def test_completions_end_at_very_different_lengths(report):
    d = report["variants"][0]["completion_length_distribution"]
    assert d["min"] < d["max"] == 16  # some rows stop early, some run to max_new_tokens
    assert d["eos"] + d["stop"] > 0 and d["length"] > 0


def test_bad_settings_are_one_line_errors():
    with pytest.raises(JobError, match="variants: 'fp8'"):
        bench.load_bench(None, ["variants=[fp8]"])
    with pytest.raises(JobError, match="unknown key promts; did you mean prompts"):
        bench.load_bench(None, ["promts=3"])
