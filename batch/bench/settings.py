"""The bench's settings: jobs/bench*.yaml as dataclasses (overridable with key=value), the modes' names, the variants."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from batch.config import (
    DEFAULT_STOP,
    _JobLoader,
    _apply_override,
    _build,
)
from batch.errors import JobError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JOB = ROOT / "jobs" / "bench.yaml"
VLLM_TOOL = ROOT / "tools" / "vllm_bench.py"
VLLM_PYTHON_ENV = "KOMT_VLLM_PYTHON"  # vLLM's python when the bench file's vllm_python is null
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("single", "fixed", "engine", "dequantized", "sampling", "generate_batch", "unshared", "vllm")
MODE_LABELS = {
    "single": "1 one at a time (model card)",
    "fixed": "2 HF fixed batches, input order",
    "engine": "3 komt-batch",
    "dequantized": "4 komt-batch, dequantized",
    "sampling": "5 komt-batch, sampling",
    "generate_batch": "6 HF generate_batch",
    "unshared": "7 komt-batch, share_prefix off",
    "vllm": "8 vLLM LLM.generate",
}
ON_DEQUANTIZED = ("dequantized", "sampling", "generate_batch", "unshared")  # for NF4 variants: after the model is dequantized
GREEDY = ("single", "fixed", "engine", "dequantized", "generate_batch", "unshared", "vllm")
BUILD_VERSION = 5  # bump when the way the model is built changes (forces a rebuild of model.dir)


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
    # An annotation workload: every prompt starts with the same instruction of about this many tokens,
    # then its item (of the lognormal length above); 0: no shared text beyond the template's head
    shared_instruction: int = 0
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=lambda: list(DEFAULT_STOP))
    fixed_batch_size: int = 32  # mode 2
    max_batch_size: int = 32  # modes 3-5: the job's batching limits (the running batch: memory.running_limits)
    max_batch_tokens: int = 65536
    single_limit: int | None = None  # mode 1 on the first K prompts only (None: all)
    fixed_limit: int | None = None  # mode 2 on the first K prompts only (None: all)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    mode_budget: float | None = None  # seconds a mode may run before it is stopped and recorded as skipped
    generate_batch_budget: float | None = None  # mode 6's own budget in place of mode_budget (None: mode_budget)
    variants: list[str] = field(default_factory=lambda: ["float32", "nf4+lora"])
    compute_dtype: str = "float32"  # for quantized variants (and the model built on a GPU)
    device: str = "cpu"  # cpu | cuda
    seed: int = 0
    vllm_python: str | None = None  # vLLM's python for mode 8; None: $KOMT_VLLM_PYTHON; neither: mode 8 is skipped
    vllm_kv_cache_gib: float = 2.0
    vllm_timeout: float = 3600.0
    threads: int | None = None  # torch threads (None: torch's default, one per core)
    quiet_wait: float = 120.0  # before each mode, wait up to this many seconds for other processes to go quiet
    output: str = "out/bench.json"
    model: BenchModel = field(default_factory=BenchModel)

    def validate(self, where: str) -> None:
        for key in ("prompts", "prompt_min", "prompt_median", "max_new_tokens", "fixed_batch_size", "max_batch_size", "max_batch_tokens"):
            if getattr(self, key) < 1:
                raise JobError(f"{where}: {key}: must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.prompt_sigma < float("inf"):
            raise JobError(f"{where}: prompt_sigma: must be a number >= 0, got {self.prompt_sigma}")
        if self.threads is not None and self.threads < 1:
            raise JobError(f"{where}: threads: must be >= 1 (or null for torch's default, one per core), got {self.threads}")
        if not 0 <= self.quiet_wait < float("inf"):
            raise JobError(f"{where}: quiet_wait: must be a number of seconds >= 0, got {self.quiet_wait}")
        if self.shared_instruction < 0:
            raise JobError(f"{where}: shared_instruction: must be >= 0 tokens, got {self.shared_instruction}")
        if self.prompt_max < self.prompt_min:
            raise JobError(f"{where}: prompt_max: must be >= prompt_min ({self.prompt_min}), got {self.prompt_max}")
        if not self.prompt_min <= self.prompt_median <= self.prompt_max:  # (else every prompt is clipped to one end)
            raise JobError(f"{where}: prompt_median: must be within [prompt_min, prompt_max] ([{self.prompt_min}, {self.prompt_max}]), got {self.prompt_median}")
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
        if self.generate_batch_budget is not None and not self.generate_batch_budget > 0:
            raise JobError(f"{where}: generate_batch_budget: must be > 0 seconds (or null for mode_budget), got {self.generate_batch_budget}")
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
            raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_JobLoader) or {}
        except FileNotFoundError:
            raise JobError(f"{where}: bench file not found") from None
        except yaml.YAMLError as e:
            raise JobError(f"{where}: YAML syntax error: {e}") from None
        if not isinstance(raw, dict):
            raise JobError(f"{where}: the bench file must be a mapping of settings")
    for item in overrides:
        _apply_override(raw, item, where, BenchConfig)
    cfg = _build(BenchConfig, raw, where, prefix="")
    if cfg.vllm_python is None:
        cfg.vllm_python = os.environ.get(VLLM_PYTHON_ENV) or None
    cfg.validate(where)
    return cfg
