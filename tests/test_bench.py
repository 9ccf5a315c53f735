"""komt-batch bench on tiny settings: every mode and figure is there (NF4 resident, dequantized,
sampling, transformers' generate_batch), greedy outputs agree across modes, the job's planner +
engine waste less than fixed batches in input order, and a failing or overrunning mode costs no
other mode's figures."""

from __future__ import annotations

import json
import time

import pytest

from batch.bench import main as bench_main
from batch.bench.measuring import peak_bandwidth, roof_share
from batch.bench.model import tilt_output_rows
from batch.bench.modes import run_mode
from batch.bench.run import cross_targets
from batch.bench.settings import DEFAULT_JOB, MODE_LABELS, MODES, load_bench
from batch.errors import JobError

MODE_FIELDS = [
    "label", "rows", "wall_seconds", "generated_tokens", "tokens_per_second", "rows_per_second",
    "prompt_tokens", "padded_prompt_tokens", "prefill_efficiency", "kept_tokens", "row_steps",
    "decode_efficiency", "overhead", "peak_memory_bytes", "completion_lengths", "finish_reasons",
    "vs_single", "vs_fixed", "cpu", "weights", "rows_in_flight", "ms_per_decode_step", "prefill_share",
]
GREEDY_BATCHED = ("fixed", "engine", "dequantized", "generate_batch")


def tiny_bench(tmp, *overrides) -> dict:
    out = tmp / "bench.json"
    settings = [
        "prompts=24", "prompt_median=40", "prompt_max=200", "max_new_tokens=16", "fixed_batch_size=8",
        "max_batch_size=8", "max_batch_tokens=4096", "single_limit=null", "fixed_limit=16", "variants=[float32, nf4+lora]",
        "vllm_python=null", "quiet_wait=0", "mode_budget=600", "threads=1", f"output={out}", f"model.dir={tmp / 'model'}", "model.hidden_size=64",
        "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128", "model.tune_prompts=16", *overrides,
    ]
    assert bench_main(str(DEFAULT_JOB), settings) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return tiny_bench(tmp_path_factory.mktemp("bench"))


def variant(report, name):
    return next(v for v in report["variants"] if v["variant"] == name)


def test_report_has_every_mode_and_field(report):
    assert report["date"] and report["machine"]["cpu"] and report["machine"]["torch"] and report["complete"]
    assert report["prompts"]["count"] == 24
    assert [v["variant"] for v in report["variants"]] == ["float32", "nf4+lora"]
    for v in report["variants"]:
        modes = v["modes"]
        assert list(modes) == list(MODES)
        ran = [m for m in MODES if "skipped" not in modes[m]]
        assert ran == [m for m in MODES[:6] if m != "dequantized" or v["quantization"] == "nf4"]
        for name in ran:
            missing = [f for f in MODE_FIELDS if f not in modes[name]]
            assert not missing, f"{name} lacks {missing}"
            m = modes[name]
            assert m["tokens_per_second"] > 0 and m["peak_memory_bytes"] > 0 and m["rows_in_flight"] >= 1
            assert 0 <= m["overhead"] < 1 and m["ms_per_decode_step"] > 0
            assert m.get("bandwidth_share") is None  # no GPU, no roof
        assert modes["single"]["rows_in_flight"] == 1
        for name in ("engine", "sampling"):  # the engine's prefills: forwards of many rows each
            assert 1 <= modes[name]["prefill_forwards"] < modes[name]["rows"]
        assert modes["fixed"]["rows"] == 16 and modes["fixed"]["subsampled"]  # fixed_limit
        assert modes["generate_batch"]["setup_seconds"] >= 0 and modes["generate_batch"]["prefill_share"] is None
        assert "skipped" in modes["vllm"]  # no vllm_python: skipped with a note
        assert set(v["targets"]) >= {"engine >= 4x single (tok/s)", "engine overhead <= 5%", "sampling within 15% of greedy (tok/s)"}
    assert "only NF4 weights are dequantized" in variant(report, "float32")["modes"]["dequantized"]["skipped"]
    assert list(report["targets"]) == ["nf4+lora dequantized vs float32 engine (tok/s)", "nf4+lora vs float32: generated tokens"]
    assert report["targets"]["nf4+lora dequantized vs float32 engine (tok/s)"]["goal"] == ">= 0.9"


def test_nf4_variants_run_modes_1_to_3_resident_and_4_to_6_dequantized(report):
    v = variant(report, "nf4+lora")
    assert [v["modes"][m]["weights"] for m in MODES[:6]] == ["nf4"] * 3 + ["dequantized"] * 3
    assert v["dequantize_seconds"] is not None
    assert [variant(report, "float32")["modes"][m]["weights"] for m in ("engine", "sampling", "generate_batch")] == ["float32"] * 3


def test_batched_modes_give_the_greedy_responses_of_one_at_a_time(report):
    for v in report["variants"]:
        modes = v["modes"]
        for name in GREEDY_BATCHED:
            if "skipped" in modes[name]:
                continue
            rows = 16 if name == "fixed" else 24
            assert (modes[name]["equal_rows"], modes[name]["checked_rows"]) == (rows, rows), (v["variant"], name)
        assert modes["engine"]["generated_tokens"] == modes["single"]["generated_tokens"]
        assert "equal_rows" not in modes["sampling"]  # sampled: no agreement to check
    # dequantized weights are the NF4 layers' own values: the same responses as NF4 resident
    nf4 = variant(report, "nf4+lora")["modes"]
    assert nf4["dequantized"]["sample_responses"] == nf4["engine"]["sample_responses"]
    assert nf4["dequantized"]["generated_tokens"] == nf4["engine"]["generated_tokens"]


def test_a_merged_variant_runs_every_mode_on_the_merged_weights(tmp_path):
    v = tiny_bench(tmp_path, "variants=[nf4+lora+merged]", "modes=[single, engine, dequantized]")["variants"][0]
    assert (v["quantization"], v["lora"]) == ("nf4", True)
    assert [v["modes"][m]["weights"] for m in ("single", "engine", "dequantized")] == ["dequantized+merged"] * 3
    for name in ("engine", "dequantized"):  # greedy: one at a time's answers, on every row
        assert (v["modes"][name]["equal_rows"], v["modes"][name]["checked_rows"]) == (24, 24)


def test_engine_wastes_less_than_fixed_batches(report):
    modes = variant(report, "float32")["modes"]
    assert modes["engine"]["decode_efficiency"] > modes["fixed"]["decode_efficiency"]
    assert modes["engine"]["prefill_efficiency"] >= modes["fixed"]["prefill_efficiency"]
    assert modes["single"]["prefill_efficiency"] == 1.0
    assert modes["generate_batch"]["decode_efficiency"] < 1  # no stop words: it runs on past them


def test_completions_end_at_very_different_lengths(report):
    d = variant(report, "float32")["completion_length_distribution"]
    assert d["min"] < d["max"] == 16  # some rows stop early, some run to max_new_tokens
    assert d["eos"] + d["stop"] > 0 and d["length"] > 0


def test_a_failing_or_overrunning_mode_is_recorded_as_skipped(capsys):
    cfg = load_bench(None, ["mode_budget=0.5"])
    assert run_mode("engine", lambda: 1 / 0, cfg) == {
        "mode": 3, "label": MODE_LABELS["engine"], "skipped": "failed: ZeroDivisionError: division by zero"}
    assert "Traceback" in capsys.readouterr().err
    start = time.perf_counter()
    assert run_mode("fixed", lambda: time.sleep(10), cfg)["skipped"] == "stopped after its budget of 0.5s (mode_budget)"
    assert time.perf_counter() - start < 5
    assert run_mode("single", lambda: {"rows": 1}, cfg) == {"rows": 1}


def test_dequantized_is_compared_with_the_float32_job_and_like_for_like():
    def v(name, quantization, lora, **rates):
        return {"variant": name, "quantization": quantization, "lora": lora,
                "modes": {m: {"tokens_per_second": r} for m, r in rates.items()}}

    variants = [v("float32", "none", False, engine=100.0), v("float32+lora", "none", True, engine=80.0),
                v("nf4+lora", "nf4", True, engine=60.0, dequantized=76.0)]
    assert cross_targets(variants) == {
        "nf4+lora dequantized vs float32 engine (tok/s)": {"value": 0.76, "goal": ">= 0.9", "pass": False},
        "nf4+lora dequantized vs float32+lora engine (tok/s)": {"value": 0.95, "goal": "report", "pass": None},
    }
    variants[0]["modes"]["engine"]["generated_tokens"] = 1000
    variants[2]["modes"]["dequantized"]["generated_tokens"] = 1170  # the workloads beside the ratio
    assert cross_targets(variants)["nf4+lora vs float32: generated tokens"] == {"value": 1.17, "goal": "report", "pass": None}


def test_the_bandwidth_roof():
    assert peak_bandwidth("NVIDIA H200") == 4.8e12
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.0e12
    assert peak_bandwidth("NVIDIA L4") is None and peak_bandwidth(None) is None
    # 2 rows, prompts of 10 and 20 tokens, 3 and 1 tokens kept: the first reads 11 then 12 cached tokens
    mode = {"decode_seconds": 0.5, "decode_steps": 2, "_kept": [3, 1]}
    assert roof_share(mode, weight_bytes=1000, kv_bytes_per_token=10, prompt_lengths=[10, 20], bandwidth=1e4) == (2 * 1000 + 23 * 10) / 0.5 / 1e4
    assert roof_share({"decode_seconds": None, "decode_steps": None, "_kept": []}, 1, 1, [], 1.0) is None


def test_bad_settings_are_one_line_errors():
    with pytest.raises(JobError, match="variants: 'fp8'"):
        load_bench(None, ["variants=[fp8]"])
    with pytest.raises(JobError, match="variants: 'int8\\+lora\\+merged': only '\\+lora' or '\\+lora\\+merged'"):
        load_bench(None, ["variants=[int8+lora+merged]"])
    with pytest.raises(JobError, match="unknown key promts; did you mean prompts"):
        load_bench(None, ["promts=3"])
    with pytest.raises(JobError, match="modes: 'turbo' is not a mode; choose from single, fixed"):
        load_bench(None, ["modes=[engine, turbo]"])
    with pytest.raises(JobError, match="fixed_limit: must be >= 1"):
        load_bench(None, ["fixed_limit=0"])
    with pytest.raises(JobError, match="mode_budget: must be > 0"):
        load_bench(None, ["mode_budget=0"])


def test_the_tilt_gives_the_runs_with_and_without_the_adapter_the_same_mean_length():
    """Two groups of recorded runs whose hidden states differ by a shift (as the adapter's do): one
    direction alone ends them at different mean lengths, the second (beta, along the shift) evens
    them out, both at the target. The tuned rows end every run where the tuning predicts whatever the
    arithmetic (float32 or float64 here; another CPU's rounding): the tilted logits stay `margin`
    away from the best other ones, far beyond any rounding of these 32-term dot products."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    rows, steps, width = 40, 64, 32
    hidden = torch.randn(2 * rows, steps, width, generator=gen) + 2.0  # a common mean direction
    hidden[:rows, :, 0] += 1.5  # the "adapter" half, shifted
    best = torch.randn(2 * rows, steps, generator=gen) + 3.0
    target = 0.35 * steps

    def ends(weight, dtype):  # each run's length, from the lm_head rows as tilted, in DTYPE arithmetic
        wins = (hidden.to(dtype) @ weight[:2].detach().to(dtype).T).max(-1).values > best.to(dtype)
        return torch.where(wins.any(1), wins.float().argmax(1) + 1, torch.full((2 * rows,), steps)).float()

    def tilted(groups):  # the tilt, and both halves' mean lengths in float32 and float64 arithmetic
        model = torch.nn.Module()
        model.lm_head = torch.nn.Linear(width, 4, bias=False)
        torch.nn.init.normal_(model.lm_head.weight, 0, 0.02, generator=torch.Generator().manual_seed(1))
        tilt = tilt_output_rows(model, hidden, best, eos_id=0, stop_id=1, mean_target=target, groups=groups)
        n32, n64 = ends(model.lm_head.weight, torch.float32), ends(model.lm_head.weight, torch.float64)
        assert torch.equal(n32, n64)  # the same ends in either arithmetic
        w = model.lm_head.weight[:2].detach()
        rounding = (hidden @ w.T - (hidden.double() @ w.double().T)).abs().max().item()
        margin = (hidden.double() @ w.double().T - best.double()[..., None]).abs().min().item()  # tilted logits vs the best others
        assert margin > 10 * rounding and margin == pytest.approx(tilt["margin"], rel=0.01), (margin, rounding)  # ends no rounding moves
        return tilt, n32[:rows].mean().item(), n32[rows:].mean().item()

    (one, a1, b1), (two, a2, b2) = tilted(1), tilted(2)
    assert one["beta"] == 0 and abs((a1 + b1) / 2 - target) < 2 and abs(a1 - b1) > 8  # one direction: two workloads
    assert abs((a2 + b2) / 2 - target) < 2 and abs(a2 - b2) < 3, (a2, b2)  # two: the same mean length
    assert (a2, b2) == pytest.approx((two["predicted"]["mean_with_adapter"], two["predicted"]["mean_without"]), abs=1e-4)  # as predicted
