"""Sizing from the device's memory: whether the 4-bit weights are dequantized (model.weights: auto),
and how many rows generate at once (the running batch: rows and their KV-cache tokens).

Both are properties of the device, not of the job's outputs: they stay out of the plan and its
fingerprint, so the plan's batches remain the unit of commits and a run started on one GPU resumes
on another with less memory. The arithmetic is pure (numbers in, numbers and a log line out);
`free_memory` and `running_limits` read the device.

On a GPU the running batch holds as many rows as the free memory holds KV cache for, less a headroom
fraction and the scratch memory of a prefill and of each row's logits. On the CPU it keeps the job's
batch limits (max_batch_size rows within max_batch_tokens): there the forward is compute-bound and
larger batches gain nothing. `batching.running_rows` / `running_tokens` set either explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

GiB = 2**30


def size(n: int) -> str:
    """Bytes for the log: GiB, or MiB under one GiB (the tiny test model's weights are a few MiB)."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"

KEEP_FOR_KV = 0.5  # auto dequantizes when the KV cache keeps at least this share of the free memory
PREFILL_TOKENS = 8192  # = engine.PREFILL_GROUP_TOKENS: the most positions one prefill forward computes
LOGIT_COPIES = 3  # per row: float32 logits, warped scores and probabilities (sampling)
MAX_ROWS = 512  # past a few hundred rows a 7B decode step is bound by arithmetic, not by reading the
# weights: more rows add little speed, and every row costs per-step Python work (stop checks)


def dequantizing_fits(free: int, nf4_bytes: int, dense_bytes: int) -> tuple[bool, str]:
    """model.weights: auto. Dequantizing turns nf4_bytes of 4-bit layers into dense_bytes; do it when
    what is left of the free memory is still at least KEEP_FOR_KV of it: a good KV cache is at least
    half the one the 4-bit weights would leave room for. Returns (dequantize?, why)."""
    left = free - (dense_bytes - nf4_bytes)
    sizes = f"dequantized they take {size(dense_bytes)}, leaving {size(max(left, 0))} of {size(free)} free"
    if left >= KEEP_FOR_KV * free:
        return True, f"{sizes}, at least {KEEP_FOR_KV:.0%} kept for the KV cache"
    return False, f"{sizes}, under {KEEP_FOR_KV:.0%} kept for the KV cache"


@dataclass(frozen=True)
class ModelShape:
    """What the memory of generating depends on: a decoder's dimensions and its activations' dtype."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> ModelShape:
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            dtype_bytes=dtype.itemsize,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of every layer for one token (Llama-2-7B in bf16: 0.5 MiB)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def activation_bytes_per_token(self) -> int:
        """One layer's live activations for one position: hidden-sized tensors (residual, norm,
        q/k/v, attention output, ...) and the MLP's four intermediate-sized ones (gate and up side by
        side from one GEMM, batch.layers.PackedMLP; the activation; its product)."""
        return (8 * self.hidden + 4 * self.intermediate) * self.dtype_bytes


def kv_bytes_remade(shape: ModelShape) -> float:
    """Bytes per token of KV-cache budget: every layer's, and one layer's more for a remake."""
    return shape.kv_bytes_per_token * (shape.layers + 1) / shape.layers


def size_running_batch(free: int, shape: ModelShape, max_new_tokens: int, headroom: float,
                       rows: int | None = None, tokens: int | None = None) -> tuple[int, int]:
    """Rows generating at once and their KV-cache budget in tokens (rows x (longest prompt + max_new_tokens),
    as Engine.stream counts it), from `free` bytes of device memory with the weights loaded.

    Of free x (1 - headroom): the scratch of one prefill (its own KV cache, copied into the running
    batch's, and its activations), the per-row logits and activations of MAX_ROWS rows, and the rest
    for the KV cache, with one layer's more: the engine remakes the running batch's buffers layer by
    layer, the old layer freed once copied (SlotCache.reserve). Rows: as many as the budget could ever hold (a row
    takes at least 1 + max_new_tokens tokens), at most MAX_ROWS; the engine fits the rows that join
    to the budget at their real widths. `rows` and `tokens` (batching.running_rows/running_tokens)
    replace what would be sized."""
    usable = int(free * (1 - headroom))
    prefill = PREFILL_TOKENS * (shape.kv_bytes_per_token + shape.activation_bytes_per_token)
    per_row = LOGIT_COPIES * 4 * shape.vocab + shape.activation_bytes_per_token
    if tokens is None:
        kv = usable - prefill - (rows or MAX_ROWS) * per_row
        tokens = max(int(kv // kv_bytes_remade(shape)), 1 + max_new_tokens)
    if rows is None:
        rows = max(1, min(MAX_ROWS, tokens // (1 + max_new_tokens)))
    return rows, tokens


def running_limits(batching, model, max_new_tokens: int) -> tuple[int, int, str]:
    """The running batch's limits for this job on the model's device: (rows, tokens, log line).

    `batching` is the job's BatchingConfig, `model` the loaded model (its device, config and
    activation dtype are read), `max_new_tokens` the job's generation.max_new_tokens. Pass rows and
    tokens to Engine.stream as max_rows and budget; print the line to stderr. On a GPU the limits are
    sized from its free memory now (torch.cuda.mem_get_info, plus what PyTorch holds unused), less
    batching.memory_headroom; on the CPU they are max_batch_size and max_batch_tokens. Explicit
    batching.running_rows / running_tokens win on any device."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        rows = batching.running_rows or batching.max_batch_size
        tokens = batching.running_tokens or batching.max_batch_tokens
        return rows, tokens, f"komt-batch: running batch: up to {rows} rows within {tokens} tokens (the job's batch limits on the {device.type})"
    dtype = model.get_input_embeddings().weight.dtype
    shape = ModelShape.of(model.config, dtype)
    free, where = free_memory(device)
    rows, tokens = size_running_batch(free, shape, max_new_tokens, batching.memory_headroom,
                                      batching.running_rows, batching.running_tokens)
    kv = tokens * kv_bytes_remade(shape)
    how = ", ".join(f"batching.{k} set" for k in ("running_rows", "running_tokens") if getattr(batching, k) is not None) or "sized"
    return rows, tokens, (
        f"komt-batch: running batch: up to {rows} rows within {tokens} tokens of KV cache "
        f"({kv / GiB:.1f} GiB with one layer's copy while it is remade; {free / GiB:.1f} GiB free on {where}, "
        f"headroom {batching.memory_headroom:.0%}; {how})"
    )


def free_memory(device: torch.device) -> tuple[int, str]:
    """Bytes this process can still allocate on `device`, and the device's name for the log: on a
    GPU what the driver reports free plus what PyTorch's allocator holds unused; on the CPU the
    kernel's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + unused, f"{device} ({torch.cuda.get_device_name(device)})"
    return _mem_available(), "the CPU"


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )
