"""The modes: the same prompts through the model card's loop, HF fixed batches, this job's engine, transformers' generate_batch and vLLM; each measured the same way, each within its budget."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import torch

from batch.bench.measuring import (
    CpuProbe,
    ForwardTimer,
    inner_model,
    peak_memory,
    quantiles,
    release_memory,
    reset_peak_memory,
    sync,
)
from batch.bench.settings import (
    MODE_LABELS,
    MODES,
    ROOT,
    VLLM_PYTHON_ENV,
    VLLM_TOOL,
    BenchConfig,
    Variant,
)
from batch.config import (
    BatchingConfig,
    GenerationSettings,
)

# --- the modes -----------------------------------------------------------------------------------


class Rule:
    """The job's stop rule (stops.py), to measure every mode's output the same way (without the
    prompt's context: the modes' outputs are compared with each other)."""

    def __init__(self, tokenizer, stop: list[str]):
        from batch.stops import StopRule

        self.tokenizer = tokenizer
        self.eos_ids = {tokenizer.eos_token_id}
        self.rule = StopRule(self.decode, stop, self.eos_ids, special_ids=set(tokenizer.all_special_ids))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def trim(self, ids: list[int]) -> tuple[str, str]:
        return self.rule.finish([], ids[: self.kept(ids)])[:2]

    def kept(self, ids: list[int]) -> int:
        """Tokens the engine would have generated: up to the first EOS or the token completing a stop word."""
        return next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids or self.rule.hit([], ids[: i + 1])), len(ids))


def _mode_result(mode: str, *, rows: int, wall: float, kept: list[int], responses: list[str], reasons: list[str],
                 prompt_tokens: int, padded_prompt_tokens: int, row_steps: int, steps: int | None,
                 forward_seconds: float | None, decode_seconds: float | None = None, prefill_seconds: float | None = None,
                 decode_steps: int | None = None, rows_in_flight: float | None = None, peak: tuple[int, str], **extra) -> dict:
    generated = int(sum(kept))
    computed = extra.get("prefilled_prompt_tokens", prompt_tokens)  # (fewer where shared prefixes were copied, not computed)
    reason_counts = {r: reasons.count(r) for r in ("eos", "stop", "length", "error")}
    return {
        "mode": MODES.index(mode) + 1, "label": MODE_LABELS[mode], "rows": rows, "wall_seconds": round(wall, 3),
        "generated_tokens": generated, "tokens_per_second": generated / wall, "rows_per_second": rows / wall,
        "prompt_tokens": prompt_tokens, "padded_prompt_tokens": padded_prompt_tokens,
        "prefill_efficiency": computed / padded_prompt_tokens if padded_prompt_tokens else None,
        "kept_tokens": generated, "row_steps": row_steps, "decode_efficiency": generated / row_steps if row_steps else None,
        "steps": steps, "rows_in_flight": rows_in_flight or (row_steps / steps if steps else None),
        "forward_seconds": None if forward_seconds is None else round(forward_seconds, 3),
        "overhead": None if forward_seconds is None else max(0.0, 1 - forward_seconds / wall),
        "decode_seconds": decode_seconds, "decode_steps": decode_steps,
        "ms_per_decode_step": 1000 * decode_seconds / decode_steps if decode_seconds is not None and decode_steps else None,
        "prefill_seconds": prefill_seconds, "prefill_share": None if prefill_seconds is None else prefill_seconds / wall,
        "peak_memory_bytes": peak[0], "peak_memory_kind": peak[1],
        "completion_lengths": quantiles(kept), "finish_reasons": reason_counts,
        "responses": responses, "_kept": kept, **extra,
    }


class Measured:
    """One mode's measurement, as a context: wall clock and CPU use inside it, time in the model's
    forward calls (hooks; decode steps apart), peak memory. `result` holds them after the block."""

    def __init__(self, model, device: str):
        self.model, self.device = model, device
        self.result: dict = {}

    def __enter__(self) -> Measured:
        self.timer = ForwardTimer(inner_model(self.model), self.device)
        reset_peak_memory(self.device)
        sync(self.device)
        self.probe = CpuProbe()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.close()
        if exc[0] is not None:
            return
        sync(self.device)
        t = self.timer
        self.result = {"wall": time.perf_counter() - self.start, "cpu": self.probe.stop(), "forward_seconds": t.seconds,
                       "decode_seconds": t.decode_seconds, "prefill_seconds": t.prefill_seconds, "decode_steps": t.decode_calls,
                       "forward_calls": t.calls, "peak": peak_memory(self.device)}


def _generate_result(mode: str, outputs: list[list[int]], trimmed: list[tuple[str, str]], rule: Rule, measured: dict, **counts) -> dict:
    """A model.generate mode's result: generated ids, and (response, finish reason) by the job's rule."""
    return _mode_result(mode, rows=len(outputs), kept=[rule.kept(g) for g in outputs], responses=[t[0] for t in trimmed],
                        reasons=[t[1] for t in trimmed], **measured, **counts)


@torch.inference_mode()
def run_single(model, tokenizer, prompts: list[str], cfg: BenchConfig, rule: Rule) -> dict:
    """Mode 1, as on the model card: tokenize one prompt, model.generate, decode, trim."""
    outputs, trimmed, prompt_tokens = [], [], 0
    with Measured(model, cfg.device) as clock:
        for text in prompts:
            enc = tokenizer(text, return_tensors="pt").to(model.device)
            out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False, stop_strings=cfg.stop,
                                 tokenizer=tokenizer, pad_token_id=tokenizer.unk_token_id)
            width = enc["input_ids"].shape[1]
            generated = out[0, width:].tolist()
            outputs.append(generated), trimmed.append(rule.trim(generated))
            prompt_tokens += width
    steps = sum(len(g) for g in outputs)
    return _generate_result("single", outputs, trimmed, rule, clock.result, prompt_tokens=prompt_tokens,
                            padded_prompt_tokens=prompt_tokens, row_steps=steps, steps=steps)


@torch.inference_mode()
def run_fixed(model, tokenizer, prompts: list[str], cfg: BenchConfig, rule: Rule) -> dict:
    """Mode 2: batches of fixed_batch_size in input order, left-padded, model.generate with stop_strings."""
    from transformers import AutoTokenizer

    padded = AutoTokenizer.from_pretrained(tokenizer.name_or_path)  # its own copy: pad = <unk>, left
    padded.pad_token, padded.padding_side = padded.unk_token, "left"
    outputs, trimmed, prompt_tokens, padded_tokens, row_steps, steps = [], [], 0, 0, 0, 0
    with Measured(model, cfg.device) as clock:
        for s in range(0, len(prompts), cfg.fixed_batch_size):
            enc = padded(prompts[s : s + cfg.fixed_batch_size], padding=True, return_tensors="pt").to(model.device)
            out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False, stop_strings=cfg.stop,
                                 tokenizer=padded, pad_token_id=padded.pad_token_id)
            rows, width = enc["input_ids"].shape
            for g in out[:, width:].tolist():
                outputs.append(g), trimmed.append(rule.trim(g))
            prompt_tokens += int(enc["attention_mask"].sum())
            padded_tokens += rows * width
            row_steps += rows * (out.shape[1] - width)
            steps += out.shape[1] - width
    return _generate_result("fixed", outputs, trimmed, rule, clock.result, prompt_tokens=prompt_tokens, padded_prompt_tokens=padded_tokens,
                            row_steps=row_steps, steps=steps, batches=math.ceil(len(prompts) / cfg.fixed_batch_size))


def run_engine(mode: str, model, tokenizer, prompts: list[str], cfg: BenchConfig, sample: bool = False, share_prefix: bool = True) -> dict:
    """Modes 3-5 and 7: what `komt-batch run` does -- tokenize, plan_batches, then the batches' rows streamed
    (batch by batch tokenized) through SafeGenerator.stream, its running batch sized as the job's
    (SafeGenerator.for_job): finished rows' places are refilled. Greedy, or the model card's sampling;
    shared prompt prefixes prefilled once, or (mode 7, batching.share_prefix: false) once per row."""
    from batch.engine import Engine, Request, SafeGenerator, row_seed
    from batch.plan import plan_batches

    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, do_sample=sample, seed=cfg.seed, stop=list(cfg.stop))
    engine = Engine(model, tokenizer, settings, share_prefix=share_prefix)
    device = cfg.device
    # the engine's own clocks where it keeps them (hooks see no forward replayed from a CUDA graph); else hooks
    timer = None if hasattr(engine, "decode_seconds") else ForwardTimer(inner_model(model), device)
    try:
        reset_peak_memory(device)
        completions: list = [None] * len(prompts)
        sync(device)
        probe = CpuProbe()
        start = time.perf_counter()
        lengths = [len(ids) for ids in engine.tokenize(prompts)]
        batches = plan_batches(lengths, cfg.max_new_tokens, cfg.max_batch_size, cfg.max_batch_tokens)
        batching = BatchingConfig(max_batch_size=cfg.max_batch_size, max_batch_tokens=cfg.max_batch_tokens)
        generator = SafeGenerator.for_job(engine, batching, cfg.max_new_tokens)

        def requests():
            for batch in batches:
                for i, ids in zip(batch, engine.tokenize([prompts[i] for i in batch])):
                    yield Request(i, ids, row_seed(cfg.seed, str(i)))

        for i, c in generator.stream(requests()):
            completions[i] = c
        sync(device)
        wall = time.perf_counter() - start
        cpu = probe.stop()
    finally:
        if timer:
            timer.close()
    if timer:
        decode_seconds, prefill_seconds, decode_steps = timer.decode_seconds, timer.prefill_seconds, timer.decode_calls
    else:
        decode_seconds, prefill_seconds, decode_steps = engine.decode_seconds, engine.prefill_seconds, engine.decode_steps
    errors = [c.error for c in completions if c.error]
    in_flight = engine.row_steps / engine.steps if engine.steps else None
    running_rows = getattr(generator, "max_rows", None)
    return _mode_result(mode, rows=len(prompts), wall=wall, kept=[c.completion_tokens for c in completions],
                        responses=[c.response for c in completions], reasons=[c.finish_reason for c in completions],
                        prompt_tokens=sum(lengths), padded_prompt_tokens=engine.padded_prompt_tokens,
                        # the engine counts rows in its decode steps; each row's first token came from its prefill
                        row_steps=engine.row_steps + len(prompts), steps=engine.steps, forward_seconds=engine.forward_seconds,
                        rows_in_flight=in_flight,
                        decode_seconds=decode_seconds, prefill_seconds=prefill_seconds, decode_steps=decode_steps,
                        peak=peak_memory(device), sampled=sample, graph_captures=engine.step.captures, capture_seconds=engine.capture_seconds,
                        prefill_forwards=engine.prefills, share_prefix=share_prefix,
                        shared_prompt_tokens=engine.shared_prompt_tokens, prefilled_prompt_tokens=engine.prefilled_prompt_tokens,
                        shared_reads=engine.shared_reads,  # decode steps that read their rows' shared prefix once
                        kv_cache="extents" if engine.extents else "slots",  # each row its own need, or slots as wide as the widest row
                        packed_prefill=engine.packed_prefill, mixed_steps=engine.mixed_steps,  # decode steps taken in a packed prefill's forward
                        prefilled_share=engine.prefilled_prompt_tokens / sum(lengths) if lengths else None,
                        running_rows=running_rows, running_tokens=getattr(generator, "budget", None),
                        # the pace of prefill: prompt tokens computed a second of prefill forwards (the
                        # decode rows that ride along in a join's forwards are in that time, not in the tokens)
                        prefill_tokens_per_second=engine.prefilled_prompt_tokens / prefill_seconds if prefill_seconds else None,
                        rows_in_flight_share=in_flight / running_rows if in_flight and running_rows else None,  # of the running batch's rows
                        batches=len(batches), batch_sizes=quantiles([len(b) for b in batches]),
                        oom_splits=generator.oom_splits, errors=errors[:5], error_rows=len(errors), cpu=cpu)


@torch.inference_mode()
def run_generate_batch(model, tokenizer, prompts: list[str], cfg: BenchConfig, rule: Rule) -> dict:
    """Mode 6: transformers' continuous batching, as `model.generate_batch` runs it (its context
    manager, the requests added at once, results collected as they finish), greedy, no stop words.
    Its setup (the paged KV cache, CUDA-graph warm-up) is timed apart, in `setup_seconds`: a one-off
    that a long job pays once. On a GPU it sizes itself from free memory, as the job's running batch
    does; on the CPU it gets the job's limits (max_batch_size rows, max_batch_tokens of KV cache),
    as the engine does there, instead of most of the machine's RAM."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.unk_token_id)
    hints = WorkloadHints(max_prompt_length=max(map(len, ids)), max_generated_length=cfg.max_new_tokens, num_requests=len(ids))
    limits = ContinuousBatchingConfig()
    if cfg.device == "cpu":
        limits = ContinuousBatchingConfig(max_requests_per_batch=cfg.max_batch_size, num_blocks=math.ceil(cfg.max_batch_tokens / limits.page_size))
    t0 = time.perf_counter()
    setup, results = None, {}
    try:
        with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=limits, block=True, timeout=5,
                                                       workload_hints=hints) as manager:
            setup = time.perf_counter() - t0
            with Measured(model, cfg.device) as clock:
                keys = manager.add_requests(inputs=ids, max_new_tokens=cfg.max_new_tokens)
                while len(results) < len(keys):
                    r = manager.get_result(timeout=1)
                    if r is not None and r.is_finished():
                        results[r.request_id] = r
                    elif r is None and not manager.is_running():
                        raise RuntimeError(f"generate_batch's generation thread stopped with {len(keys) - len(results)} rows unfinished")
    except OverBudget:
        # (on the way out transformers logs "Tried to perform a generation step before the batch processor was
        # initialized": its thread's next step after the manager is torn down, not the cause)
        raise OverBudget(_partial_rate(results, len(ids), t0, setup)) from None
    failed = [results[k].error for k in keys if results[k].error]
    if failed:
        raise RuntimeError(f"generate_batch: {len(failed)} rows failed: {failed[0]}")
    outputs = [list(results[k].generated_tokens) for k in keys]
    measured = clock.result
    calls = measured.pop("forward_calls")
    # its steps mix prefill and decode rows, so they are not split: all of them count as steps
    measured.update(decode_seconds=measured["forward_seconds"] if calls else None, prefill_seconds=None, decode_steps=calls or None)
    lengths = [len(i) for i in ids]
    return _generate_result("generate_batch", outputs, [rule.trim(g) for g in outputs], rule, measured,
                            prompt_tokens=sum(lengths), padded_prompt_tokens=sum(lengths),  # ragged batches: no padding
                            row_steps=sum(len(g) for g in outputs), steps=calls or None, setup_seconds=round(setup, 2),
                            note="no stop words in transformers' continuous batching; its steps mix prefill and decode (ms/step over all)")


def run_vllm(cfg: BenchConfig, variant: Variant, meta: dict, tokenizer, prompts: list[str], rule: Rule, log_path: Path) -> dict:
    """Mode 8: tools/vllm_bench.py under cfg.vllm_python, on the saved float32 model (and adapter)."""
    python = cfg.vllm_python
    if cfg.device != "cpu":
        return skipped("vllm", "vLLM is run only for device: cpu in this bench")
    if not python:
        return skipped("vllm", f"not measured: no vLLM venv: set vllm_python in the bench file or {VLLM_PYTHON_ENV} (docs/performance.md, the vLLM peer)")
    if not Path(python).exists():
        return skipped("vllm", f"not measured: no vLLM venv: vllm_python {python!r} not found (docs/performance.md, the vLLM peer: how to install it)")
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    request = {
        "model": str(Path(meta["base"]).resolve()), "adapter": str(Path(meta["adapter"]).resolve()) if variant.lora else None,
        "lora_rank": cfg.model.lora_rank, "prompts": ids, "max_new_tokens": cfg.max_new_tokens, "stop": cfg.stop,
        "max_model_len": max(map(len, ids)) + cfg.max_new_tokens, "kv_cache_bytes": int(cfg.vllm_kv_cache_gib * 1024**3),
        "dtype": "float32", "prefix_caching": cfg.shared_instruction > 0,  # (the annotation workload: vLLM's prefix caching on)
    }
    note = "float32 weights = the NF4 values (the model is saved NF4-round-tripped); vLLM has no bitsandbytes on the CPU" if variant.quantization != "none" else None
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen([python, str(VLLM_TOOL), f.name], stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
            try:
                stdout, _ = proc.communicate(timeout=cfg.vllm_timeout)
            except BaseException:  # a timeout, Ctrl-C, SIGTERM or the mode's budget: stop vLLM and its engine processes too
                proc.terminate()  # the tool kills its children on SIGTERM
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
    except subprocess.TimeoutExpired:
        return skipped("vllm", f"vLLM timed out after {cfg.vllm_timeout:.0f}s (log: {log_path})")
    finally:
        os.unlink(f.name)
    try:
        result = json.loads(stdout)
    except ValueError:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return skipped("vllm", f"vLLM failed (exit {proc.returncode}; log {log_path}): {' | '.join(tail)}")
    outputs = result.pop("outputs")
    trimmed = [rule.trim(g) for g in outputs]
    kept = [rule.kept(g) for g in outputs]
    lengths = [len(i) for i in ids]
    return _mode_result("vllm", rows=len(prompts), wall=result["generate_seconds"], kept=kept,
                        responses=[r for r, _ in trimmed], reasons=[w for _, w in trimmed],
                        prompt_tokens=sum(lengths), padded_prompt_tokens=sum(lengths),  # no padding: paged KV cache
                        row_steps=sum(len(g) for g in outputs), steps=None, forward_seconds=None,
                        peak=(result.get("peak_rss_bytes", 0), "RSS high-water, vLLM's processes together (sampled)"),
                        load_seconds=result.get("load_seconds"), vllm_version=result.get("vllm_version"),
                        vllm_threads=result.get("threads"), note=note, cpu=result.get("cpu"))


def skipped(mode: str, why: str) -> dict:
    return {"mode": MODES.index(mode) + 1, "label": MODE_LABELS[mode], "skipped": why}


class OverBudget(BaseException):
    """A mode ran past its budget. A BaseException: the engine and transformers catch Exception (to
    redo rows, or to log and go on), and this must stop the mode, not be retried. Its argument, if
    any, says what the mode had done by then."""


def _partial_rate(results: dict, rows: int, t0: float, setup: float | None) -> str:
    """What generate_batch had done when its budget ran out: the rows finished and their tokens per
    second since its setup (a lower bound: the rows still running had generated tokens too)."""
    if setup is None:
        return f"still in its setup (paged cache, warm-up) after {time.perf_counter() - t0:.1f}s"
    elapsed = time.perf_counter() - t0 - setup
    tokens = sum(len(r.generated_tokens) for r in results.values())
    return (f"{len(results)} of {rows} rows finished after a {setup:.1f}s setup, {tokens} tokens in {elapsed:.1f}s: "
            f"{tokens / elapsed:.1f} tok/s over the finished rows (a lower bound)")


def run_mode(mode: str, run, cfg: BenchConfig) -> dict:
    """run() within its budget (cfg.mode_budget seconds; generate_batch_budget for mode 6, when set);
    a failure or an overrun becomes a skipped mode, with why (and what it had done, where the mode
    says), and the bench goes on to the next mode (its memory freed)."""

    def stop(signum, frame):
        raise OverBudget

    own = mode == "generate_batch" and cfg.generate_batch_budget is not None
    budget = cfg.generate_batch_budget if own else cfg.mode_budget
    previous = signal.signal(signal.SIGALRM, stop) if budget else None
    if budget:
        signal.setitimer(signal.ITIMER_REAL, budget)
    try:
        return run()
    except OverBudget as over:
        key = "generate_batch_budget" if own else "mode_budget"
        return skipped(mode, f"stopped after its budget of {budget:g}s ({key})" + (f": {over.args[0]}" if over.args else ""))
    except Exception as e:  # noqa: BLE001 -- one mode's failure must not cost the others' figures
        traceback.print_exc()
        return skipped(mode, f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    finally:
        if budget:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        release_memory(cfg.device)
