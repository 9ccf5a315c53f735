"""The model: load it (NF4 + LoRA, as on the model card) and generate a batch of prompts.

`Engine.generate` is a small decode loop over transformers' model forward and KV cache:

- prompts are left-padded with a pad id that is masked out everywhere (Llama-2 has no pad token;
  we use <unk>, never eos: pad = eos is what breaks batched Llama output, transformers #25790), and
  position ids count only real tokens, so a padded row computes what it would compute alone;
- every row stops on its own: on EOS, on a stop word (checked incrementally, stops.StopChecker), or
  at max_new_tokens -- and a finished row leaves the batch at once (its rows of the KV cache are
  dropped), so one long answer does not keep the others computing;
- sampling uses transformers' temperature / top-k / top-p warpers and one random generator per row,
  seeded from generation.seed and the row's id: a row's sample does not depend on which rows share
  its batch, so a resumed or re-batched run samples the same tokens.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DynamicCache,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from transformers.cache_utils import DynamicLayer
from transformers.utils import logging as hf_logging

from batch.config import GenerationSettings, ModelConfig
from batch.errors import JobError
from batch.stops import StopChecker, trim_response

# Keep the job's log readable: no per-tensor loading bar, no notice that an optional CPU kernel
# package is absent (bitsandbytes falls back to its own kernels), no deprecation chatter from peft.
hf_logging.disable_progress_bar()
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Completion:
    response: str | None
    finish_reason: str  # stop | eos | length | error
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated for the row, the stopping one included
    error: str | None = None


PREFILL_WASTE = 0.05  # a prefill group computes at most 5% padding ...
PREFILL_GROUP_TOKENS = 8192  # ... and at most this many positions (bounds the attention's scratch memory)


def prefill_groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Split prompt lengths sorted longest first into consecutive [a, b) groups with little padding."""
    groups, start, real = [], 0, 0
    for i, n in enumerate(lengths):
        padded = (i - start + 1) * lengths[start]
        if i > start and (padded * (1 - PREFILL_WASTE) > real + n or padded > PREFILL_GROUP_TOKENS):
            groups.append((start, i))
            start, real = i, 0
        real += n
    groups.append((start, len(lengths)))
    return groups


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def compact_order(keep: list[int]) -> list[int]:
    """The new slot of each row that stays when others leave: rows stay where they are, except those
    beyond the new batch size, which move into the holes -- so only they are copied in the cache."""
    size = len(keep)
    kept = set(keep)
    holes = [s for s in range(size) if s not in kept]
    movers = [s for s in keep if s >= size]
    order = list(range(size))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    return order


class PreallocatedLayer(DynamicLayer):
    """A KV-cache layer with room for the whole generation. transformers' DynamicLayer concatenates
    at every step, copying the whole cache each time (quadratic in the length); this one writes the
    new position in place and exposes views of the filled part."""

    def __init__(self, like: torch.Tensor, rows: int, capacity: int):
        super().__init__()
        shape = (rows, like.shape[1], capacity, like.shape[3])
        self.buf_k, self.buf_v = like.new_zeros(shape), like.new_zeros(shape)  # zeros: padding stays finite
        self.device, self.is_initialized, self.length = like.device, True, 0
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.buf_k[:, :, : self.length], self.buf_v[:, :, : self.length]

    def write(self, a: int, b: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.buf_k[a:b, :, start : start + keys.shape[-2]] = keys
        self.buf_v[a:b, :, start : start + values.shape[-2]] = values

    def set_length(self, length: int) -> None:
        self.length = length
        self._views()

    def update(self, key_states, value_states, *args, **kwargs):
        self.write(0, self.buf_k.shape[0], self.length, key_states, value_states)
        self.set_length(self.length + key_states.shape[-2])
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        size = len(indices)
        moved = (indices != torch.arange(size, device=indices.device)).nonzero().squeeze(1)
        if bool((indices[moved] >= size).all()):  # compact_order's shape: copy only the movers
            for buf in (self.buf_k, self.buf_v):
                buf[moved] = buf[indices[moved]]
            self.buf_k, self.buf_v = self.buf_k[:size], self.buf_v[:size]
        else:
            self.buf_k, self.buf_v = self.buf_k[indices], self.buf_v[indices]
        self._views()


def row_seed(seed: int, row_id: str) -> int:
    """A row's sampling seed: stable across runs, batches and machines."""
    digest = hashlib.sha256(f"{seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Engine:
    def __init__(self, model, tokenizer, settings: GenerationSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = model.device
        self.pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.unk_token_id, 0) if t is not None)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        self.eos_text = tokenizer.eos_token
        self.special = list(tokenizer.all_special_tokens)
        self.stops = StopChecker(self.decode, settings.stop)
        warpers = []
        if settings.do_sample:
            if settings.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k > 0:
                warpers.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                warpers.append(TopPLogitsWarper(settings.top_p))
        self.warpers = LogitsProcessorList(warpers)
        # transformers 5.2x renamed forward's `past_key_values` to `cache`; accept either release
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_kwarg = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        self.forward_seconds = 0.0  # time inside the model's forward calls (for the overhead figure)
        self.row_steps = 0  # row x decode steps computed (for the decode-efficiency figure)
        self.padded_prompt_tokens = 0  # prompt positions computed, padding included (prefill efficiency)

    @classmethod
    def load(cls, cfg: ModelConfig, settings: GenerationSettings, where: str = "<job>") -> Engine:
        return cls(*load_model(cfg, where), settings)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """Token ids as the tokenizer makes them by default (for Llama: with BOS)."""
        return self.tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []

    def finish(self, prompt_len: int, generated: list[int]) -> Completion:
        response, reason = trim_response(self.decode(generated), self.settings.stop, self.eos_text, self.special)
        return Completion(response, reason, prompt_len, len(generated))

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], seeds: list[int]) -> list[Completion]:
        """Generate for one batch of tokenized prompts; one Completion per prompt, in order."""
        s = self.settings
        active = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # slot -> prompt, longest first
        logits, cache, mask = self._prefill([prompts[i] for i in active], s.max_new_tokens)
        next_pos = mask.sum(-1, keepdim=True)
        generators = {i: torch.Generator(self.device).manual_seed(seeds[i]) for i in active} if s.do_sample else None
        generated: list[list[int]] = [[] for _ in prompts]
        while True:
            self.row_steps += len(active)
            chosen = self._choose(logits, [generators[r] for r in active] if generators else None)
            keep = []
            for slot, (r, token) in enumerate(zip(active, chosen.tolist())):
                generated[r].append(token)
                if not (
                    token in self.eos_ids or len(generated[r]) >= s.max_new_tokens or self.stops.hit(generated[r])
                ):
                    keep.append(slot)
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch, with their KV cache rows
                order = compact_order(keep)
                index = torch.tensor(order, device=self.device)
                cache.batch_select_indices(index)
                mask, next_pos, chosen = mask[index], next_pos[index], chosen[index]
                active = [active[k] for k in order]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            logits = self._forward(chosen[:, None], mask, next_pos, cache)
            next_pos = next_pos + 1
        return [self.finish(len(p), g) for p, g in zip(prompts, generated)]

    def _prefill(self, rows: list[list[int]], max_new_tokens: int):
        """Run the prompts (longest first) in groups of near-equal length, so that little padding is
        computed, into one KV cache with room for the whole generation. Returns the last position's
        logits, the cache and the batch's attention mask (left-padded to the longest prompt)."""
        width = len(rows[0])
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(rows):
            mask[i, width - len(p) :] = 1
        layers: list[PreallocatedLayer] = []
        logits = None
        for a, b in prefill_groups([len(p) for p in rows]):
            ids, group_mask = left_pad(rows[a:b], self.pad_id)
            ids, group_mask = ids.to(self.device), group_mask.to(self.device)
            self.padded_prompt_tokens += ids.numel()
            group_cache = DynamicCache(config=self.model.config)
            out = self._forward(ids, group_mask, (group_mask.cumsum(-1) - 1).clamp(min=0), group_cache)
            if logits is None:
                logits = out.new_empty((len(rows), out.shape[-1]))
                layers = [PreallocatedLayer(g.keys, len(rows), width + max_new_tokens) for g in group_cache.layers]
            logits[a:b] = out
            for layer, g in zip(layers, group_cache.layers):
                layer.write(a, b, width - ids.shape[1], g.keys, g.values)
        cache = DynamicCache(config=self.model.config)
        cache.layers = layers
        for layer in layers:
            layer.set_length(width)
        return logits, cache, mask.to(self.device)

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        start = time.perf_counter()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: cache},
        )
        logits = out.logits[:, -1, :].float()
        if logits.is_cuda:
            torch.cuda.synchronize()
        self.forward_seconds += time.perf_counter() - start
        return logits

    def _choose(self, logits: torch.Tensor, generators) -> torch.Tensor:
        if generators is None:
            return logits.argmax(-1)
        scores = self.warpers(None, logits)
        probs = torch.softmax(scores, dim=-1)
        return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


# --- loading -------------------------------------------------------------------------------------


def quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig | None:
    if cfg.quantization == "nf4":  # the model card's setup: 4-bit NF4, double quant
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
        )
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


class SafeGenerator:
    """Engine.generate with the failures of one batch contained.

    - Out of memory: split the batch in halves and retry, down to one row; lower the token budget
      for the batches that follow (they are split to fit it). A single row that still does not fit
      becomes an error row.
    - Any other exception: retry the rows one by one, so only the row that really fails becomes an
      error row.
    Row seeds travel with their rows, so a split batch samples what the whole batch would have.
    """

    def __init__(self, engine: Engine, max_batch_tokens: int, max_new_tokens: int):
        self.engine = engine
        self.budget = max_batch_tokens
        self.max_new = max_new_tokens
        self.oom_splits = 0
        self.lowered_budget: int | None = None

    def cost(self, prompts: list[list[int]]) -> int:
        return len(prompts) * (max(len(p) for p in prompts) + self.max_new)

    def __call__(self, prompts: list[list[int]], seeds: list[int]) -> list[Completion]:
        out: list[Completion] = []
        start = 0
        while start < len(prompts):  # split to the (possibly lowered) budget; rows come longest first
            end = start + 1
            while end < len(prompts) and self.cost(prompts[start : end + 1]) <= self.budget:
                end += 1
            out += self._generate(prompts[start:end], seeds[start:end])
            start = end
        return out

    def _generate(self, prompts: list[list[int]], seeds: list[int]) -> list[Completion]:
        try:
            return self.engine.generate(prompts, seeds)
        except Exception as e:  # noqa: BLE001 -- every failure becomes split, retry or an error row
            if is_out_of_memory(e):
                _free_memory()
                if len(prompts) == 1:
                    return [error_completion(prompts[0], f"oom: out of memory even alone ({len(prompts[0])} prompt tokens)")]
                self.oom_splits += 1
                self.budget = max(1, min(self.budget, self.cost(prompts) // 2))
                self.lowered_budget = self.budget
                print(f"komt-batch: out of memory on {len(prompts)} rows: splitting; batching.max_batch_tokens lowered to {self.budget} for the rest of this run", file=sys.stderr)
                half = len(prompts) // 2
                return self._generate(prompts[:half], seeds[:half]) + self._generate(prompts[half:], seeds[half:])
            if len(prompts) == 1:
                return [error_completion(prompts[0], f"generation: {type(e).__name__}: {_first_line(e)}")]
            return [c for p, s in zip(prompts, seeds) for c in self._generate([p], [s])]


def error_completion(prompt: list[int], message: str) -> Completion:
    return Completion(None, "error", len(prompt), 0, message)


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_tokenizer(cfg: ModelConfig, where: str = "<job>"):
    """The tokenizer and the model's context length, without loading the weights (for planning)."""
    _check_paths(cfg, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.base, trust_remote_code=cfg.trust_remote_code)
        config = AutoConfig.from_pretrained(cfg.base, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise JobError(f"{where}: model.base: cannot load the tokenizer of {cfg.base}: {_first_line(e)}") from None
    if cfg.adapter and Path(cfg.adapter).is_dir():
        check_adapter_fits(config, cfg.adapter, where)
    context = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    return tokenizer, int(context)


def check_adapter_fits(config, adapter: str, where: str) -> None:
    """Compare the adapter's LoRA weight shapes with the base's layers, before any weight is loaded.

    peft would otherwise fail deep inside with a size-mismatch traceback (or not at all, for a
    missing layer). The base is built on the meta device: shapes only, no memory."""
    from safetensors import safe_open

    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.exists():
        return
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    modules = dict(base.named_modules())
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            name, _, kind = key.rpartition(".lora_")
            name = name.removeprefix("base_model.model.")
            layer = modules.get(name)
            shape = tuple(f.get_slice(key).get_shape())
            if layer is None or not hasattr(layer, "in_features"):
                problem = f"the base has no layer {name}"
            elif kind.startswith("A") and shape[-1] != layer.in_features:
                problem = f"{name} takes {layer.in_features} inputs, the adapter's lora_A expects {shape[-1]}"
            elif kind.startswith("B") and shape[0] != layer.out_features:
                problem = f"{name} gives {layer.out_features} outputs, the adapter's lora_B expects {shape[0]}"
            else:
                continue
            trained_on = _adapter_base(adapter)
            raise JobError(
                f"{where}: model.adapter: {adapter} does not fit model.base ({problem})"
                + (f"; it was trained on {trained_on}" if trained_on else "")
            )


def _check_paths(cfg: ModelConfig, where: str) -> None:
    for key, name in (("model.base", cfg.base), ("model.adapter", cfg.adapter)):
        if name and _looks_local(name) and not Path(name).expanduser().exists():
            raise JobError(f"{where}: {key}: {name}: no such directory")


def _looks_local(name: str) -> bool:
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1


def load_model(cfg: ModelConfig, where: str = "<job>"):
    """Model (base, quantized as configured, with the LoRA adapter applied) and tokenizer."""
    _check_paths(cfg, where)
    dtype = DTYPES[cfg.compute_dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.base, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.base,
            quantization_config=quantization_config(cfg),
            dtype=dtype,
            device_map=cfg.device_map,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise JobError(f"{where}: model.base: cannot load {cfg.base}: {_first_line(e)}") from None
    if cfg.quantization == "nf4" and dtype == torch.float32:
        honour_float32_compute(model)
    if cfg.adapter:
        model = _apply_adapter(model, cfg.adapter, where)
    model.eval()
    return model, tokenizer


def honour_float32_compute(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes runs 4-bit layers through a fused kernel that casts the
    activations to bfloat16 whatever bnb_4bit_compute_dtype says. With float32 compute asked for, turn
    that kernel off (dequantize + float32 matmul), so float32 means float32: rows then compute the
    same alone or in a batch (the exactness test), instead of differing by bf16 rounding."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _apply_adapter(model, adapter: str, where: str):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError) as e:
        raise JobError(f"{where}: model.adapter: cannot load {adapter}: {_first_line(e)}") from None
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        base = _adapter_base(adapter)
        raise JobError(
            f"{where}: model.adapter: {adapter} does not fit model.base (its weights' shapes differ"
            + (f"; it was trained on {base}" if base else "")
            + ")"
        ) from None


def _adapter_base(adapter: str) -> str | None:
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
