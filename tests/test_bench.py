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
from batch.bench.modes import OverBudget, run_generate_batch, run_mode, run_vllm
from batch.bench.run import check_targets, cross_targets
from batch.bench.settings import DEFAULT_JOB, MODE_LABELS, MODES, VLLM_PYTHON_ENV, load_bench
from batch.errors import JobError

MODE_FIELDS = [
    "label", "rows", "wall_seconds", "generated_tokens", "tokens_per_second", "rows_per_second",
    "prompt_tokens", "padded_prompt_tokens", "prefill_efficiency", "kept_tokens", "row_steps",
    "decode_efficiency", "overhead", "peak_memory_bytes", "completion_lengths", "finish_reasons",
    "vs_single", "vs_fixed", "cpu", "weights", "rows_in_flight", "ms_per_decode_step", "prefill_share",
]
GREEDY_BATCHED = ("fixed", "engine", "dequantized", "generate_batch", "unshared")


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
        assert ran == [m for m in MODES if m != "vllm" and (m != "dequantized" or v["quantization"] == "nf4")]
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


def test_the_engine_modes_give_their_prefill_pace_and_rows_in_flight_of_the_running_rows(report):
    """The issue's GPU targets beside tok/s: prompt tokens computed a second of prefill forwards, and
    the rows in flight as a share of the running batch's rows (here max_batch_size: the CPU's limit)."""
    for v in report["variants"]:
        for name in ("engine", "dequantized", "sampling", "unshared"):
            m = v["modes"][name]
            if "skipped" in m:
                continue
            assert m["prefill_tokens_per_second"] == pytest.approx(m["prefilled_prompt_tokens"] / m["prefill_seconds"])
            assert m["running_rows"] == 8 and m["rows_in_flight_share"] == pytest.approx(m["rows_in_flight"] / 8)
            assert 0 < m["rows_in_flight_share"] <= 1
    targets = variant(report, "nf4+lora")["targets"]  # on the CPU: reported, no goal
    for name in ("dequantized prefill >= 40000 prompt tok/s", "dequantized rows in flight >= 60% of the running rows"):
        assert targets[name]["goal"] == "report" and targets[name]["value"] > 0


def test_the_gpu_targets_of_the_dequantized_mode():
    d = {"mode": 4, "tokens_per_second": 3100.0, "prefill_tokens_per_second": 38_000.0, "rows_in_flight_share": 0.65}
    targets = check_targets({"dequantized": d}, "cuda", "nf4")
    assert {name: (t["goal"], t["pass"]) for name, t in targets.items()} == {
        "dequantized >= 3000 tok/s": (">= 3000", True),
        "dequantized prefill >= 40000 prompt tok/s": (">= 40000", False),
        "dequantized rows in flight >= 60% of the running rows": (">= 0.6", True),
    }
    d["prefill_tokens_per_second"] = None  # (no prefill timed: not a pass)
    assert check_targets({"dequantized": d}, "cuda", "nf4")["dequantized prefill >= 40000 prompt tok/s"]["pass"] is False


def test_nf4_variants_run_modes_1_to_3_resident_and_4_to_6_dequantized(report):
    v = variant(report, "nf4+lora")
    assert [v["modes"][m]["weights"] for m in MODES[:7]] == ["nf4"] * 3 + ["dequantized"] * 4
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


def test_sharing_on_and_off_side_by_side(report):
    """Today's prompts share only the template's head (too short to share): both modes prefill every
    prompt token, and the targets compare them (no regression)."""
    for v in report["variants"]:
        on, off = v["modes"]["dequantized" if v["quantization"] == "nf4" else "engine"], v["modes"]["unshared"]
        assert on["prefilled_prompt_tokens"] == off["prefilled_prompt_tokens"] == on["prompt_tokens"] and off["shared_prompt_tokens"] == 0
        assert f"mode {on['mode']} (sharing) >= 0.97x mode 7 (without) (tok/s)" in v["targets"]


def test_the_annotation_workload_shares_its_instruction(tmp_path):
    report = tiny_bench(tmp_path, "shared_instruction=120", "prompt_median=20", "prompt_max=400", "single_limit=8",
                        "modes=[single, engine, dequantized, unshared, vllm]")
    for v in report["variants"]:
        modes = v["modes"]
        on, off = modes["dequantized" if v["quantization"] == "nf4" else "engine"], modes["unshared"]
        assert on["shared_prompt_tokens"] > 0.6 * on["prompt_tokens"] and on["prefilled_share"] < 0.4 and off["prefilled_share"] == 1
        for m in (on, off):
            assert (m["equal_rows"], m["checked_rows"]) == (8, 8)
        assert on["generated_tokens"] == off["generated_tokens"]
        targets = v["targets"]
        assert targets[f"mode {on['mode']}: prompt tokens prefilled <= 20%"]["value"] == on["prefilled_share"]
        assert f"mode {on['mode']} (sharing) >= 3x mode 7 (without) (tok/s)" in targets
        assert "vLLM with prefix caching: not measured: no vLLM venv" in targets
        assert modes["vllm"]["skipped"].startswith("not measured: no vLLM venv")


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


def test_generate_batch_past_its_own_budget_says_what_it_finished(monkeypatch):
    """Mode 6 has its own budget (generate_batch_budget); stopped by it, it reports the rows it had
    finished and their rate, not the error transformers logs as its manager is torn down. The budget's
    alarm is raised here when the third row finishes (an event, not a time)."""
    import contextlib

    from batch.loading import load_model
    from tests.test_exactness import model_config, prompts_40

    model, tokenizer = load_model(model_config("float32"))
    real = model.continuous_batching_context_manager

    @contextlib.contextmanager
    def alarm_at_the_third_row(*args, **kwargs):
        with real(*args, **kwargs) as manager:
            get, finished = manager.get_result, []

            def get_result(timeout=None):
                r = get(timeout=timeout)
                finished.extend([r] if r is not None and r.is_finished() else [])
                if len(finished) == 3:
                    raise OverBudget
                return r

            manager.get_result = get_result
            yield manager

    monkeypatch.setattr(model, "continuous_batching_context_manager", alarm_at_the_third_row)
    cfg = load_bench(None, ["max_batch_size=4", "max_batch_tokens=4096", "max_new_tokens=8", "mode_budget=1", "generate_batch_budget=600"])
    result = run_mode("generate_batch", lambda: run_generate_batch(model, tokenizer, prompts_40()[:12], cfg, None), cfg)
    why = result["skipped"]
    assert why.startswith("stopped after its budget of 600s (generate_batch_budget): 2 of 12 rows finished after a "), why
    assert why.endswith(" tok/s over the finished rows (a lower bound)"), why
    with pytest.raises(JobError, match="generate_batch_budget: must be > 0"):
        load_bench(None, ["generate_batch_budget=0"])


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


@pytest.mark.parametrize("overrides, error", [  # each crashed (or was silently taken) after the model was built
    (["prompt_median=0"], "prompt_median: must be >= 1, got 0"),
    (["prompt_sigma=-1"], "prompt_sigma: must be a number >= 0, got -1"),
    (["prompt_sigma=.nan"], "prompt_sigma: must be a number >= 0, got nan"),
    (["threads=-2"], "threads: must be >= 1 (or null for torch's default, one per core), got -2"),
    (["threads=0"], "threads: must be >= 1"),  # (was taken as torch's default)
    (["quiet_wait=-5"], "quiet_wait: must be a number of seconds >= 0, got -5"),
    (["prompt_max=100", "prompt_median=500"], "prompt_median: must be within [prompt_min, prompt_max] ([8, 100]), got 500"),  # (all clipped)
])
def test_bad_workload_settings_are_one_line_errors_before_the_model_is_built(overrides, error):
    with pytest.raises(JobError) as e:
        load_bench(None, overrides)
    assert error in str(e.value)


@pytest.mark.parametrize("in_file, in_env, used", [
    (None, None, None),  # neither: mode 7 is skipped (no machine's path as a default)
    (None, "env-python", "env-python"),
    ("file-python", "env-python", "file-python"),
    ("file-python", None, "file-python"),
])
def test_vllm_python_is_the_bench_files_key_else_the_environment(monkeypatch, tmp_path, in_file, in_env, used):
    if in_env:
        monkeypatch.setenv(VLLM_PYTHON_ENV, str(tmp_path / in_env))
    else:
        monkeypatch.delenv(VLLM_PYTHON_ENV, raising=False)
    cfg = load_bench(DEFAULT_JOB, [f"vllm_python={tmp_path / in_file}"] if in_file else [])
    assert cfg.vllm_python == (str(tmp_path / used) if used else None)
    note = run_vllm(cfg, None, None, None, [], None, tmp_path / "vllm.log")["skipped"]
    if used:
        assert note == f"not measured: no vLLM venv: vllm_python {str(tmp_path / used)!r} not found (docs/performance.md, the vLLM peer: how to install it)"
    else:
        assert note == "not measured: no vLLM venv: set vllm_python in the bench file or KOMT_VLLM_PYTHON (docs/performance.md, the vLLM peer)"


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
