"""Sizing from memory, with numbers: model.weights: auto, and the running batch on a GPU of a given
free memory (a 7B-shaped Llama); on the CPU the job's batch limits."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from batch import engine, memory
from batch.config import BatchingConfig
from batch.memory import MAX_ROWS, GiB, ModelShape, dequantizing_fits, running_limits, size_running_batch

LLAMA_7B = ModelShape.of(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, vocab_size=32000), torch.bfloat16)
PROJECTIONS_7B = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # 6.48B weights in its 224 projections
BF16_7B = 2 * PROJECTIONS_7B  # dequantized: 12.06 GiB
NF4_7B = PROJECTIONS_7B // 2 + PROJECTIONS_7B // 64 + PROJECTIONS_7B // 64 // 256 * 4  # packed, 8-bit absmax, their float32 absmax: 3.11 GiB


def test_llama_2_7b_caches_half_a_mib_per_token_in_bf16():
    assert LLAMA_7B.kv_bytes_per_token == 2**19


@pytest.mark.parametrize("free_gib, dequantize", [(135, True), (75, True), (36, True), (20, True), (17, False), (11, False)])
def test_auto_dequantizes_when_half_the_free_memory_stays_for_the_kv_cache(free_gib, dequantize):
    # after loading in NF4: an H200 (135 GiB free), an H100 80GB, an A100 40GB, 24 GB cards, a 16 GB one;
    # dequantizing costs 8.95 GiB, so it pays from 17.9 GiB free on
    fits, why = dequantizing_fits(free_gib * GiB, NF4_7B, BF16_7B)
    assert fits is dequantize
    left = free_gib - (BF16_7B - NF4_7B) / GiB
    assert why == (f"dequantized they take 12.06 GiB, leaving {left:.2f} GiB of {free_gib:.2f} GiB free, "
                   + ("at least" if dequantize else "under") + " 50% kept for the KV cache")


@pytest.mark.parametrize("free_gib", [11, 20, 75, 125])
def test_the_running_batch_fits_in_free_memory_less_headroom(free_gib):
    rows, tokens = size_running_batch(free_gib * GiB, LLAMA_7B, 128, headroom=0.1)
    kv = tokens * LLAMA_7B.kv_bytes_per_token * 33 / 32  # every layer, and one layer's copy while the buffers are remade
    prefill = memory.PREFILL_TOKENS * (LLAMA_7B.kv_bytes_per_token + LLAMA_7B.activation_bytes_per_token)
    logits = MAX_ROWS * memory.LOGIT_COPIES * 4 * 32000
    assert kv + prefill + logits <= 0.9 * free_gib * GiB  # everything within the memory left after the headroom ...
    assert kv + prefill + logits > 0.9 * free_gib * GiB - 2 * GiB  # ... and little of it unused
    assert rows == min(MAX_ROWS, tokens // 129)


def test_an_h100_and_an_h200_hold_hundreds_of_rows():
    # 7B dequantized to bf16: about 66 of 80 GiB free on an H100, 125 of 141 on an H200
    assert size_running_batch(66 * GiB, LLAMA_7B, 128, 0.1) == (512, 107184)  # 248-token rows: 432 at once
    assert size_running_batch(125 * GiB, LLAMA_7B, 128, 0.1) == (512, 212638)  # 857 rows of 248 tokens
    assert size_running_batch(20 * GiB, LLAMA_7B, 512, 0.1) == (48, 24966)  # a 24 GB card, long answers


def test_explicit_rows_and_tokens_win():
    assert size_running_batch(125 * GiB, LLAMA_7B, 128, 0.1, rows=64) == (64, 213083)  # fewer rows' logits reserved
    assert size_running_batch(125 * GiB, LLAMA_7B, 128, 0.1, tokens=20000) == (155, 20000)
    assert size_running_batch(125 * GiB, LLAMA_7B, 128, 0.1, rows=7, tokens=100) == (7, 100)
    # too little memory: one row of max_new_tokens still gets its place (out-of-memory handling does the rest)
    assert size_running_batch(1 * GiB, LLAMA_7B, 128, 0.1) == (1, 129)


def test_the_prefill_scratch_is_sized_for_the_engines_largest_prefill():
    assert memory.PREFILL_TOKENS == engine.PREFILL_GROUP_TOKENS


def test_on_the_cpu_the_running_batch_keeps_the_jobs_limits():
    model = torch.nn.Linear(2, 2)  # running_limits reads only the device on the CPU
    batching = BatchingConfig(max_batch_size=32, max_batch_tokens=65536)
    assert running_limits(batching, model, 128) == (32, 65536, "komt-batch: running batch: up to 32 rows within 65536 tokens (the job's batch limits on the cpu)")
    batching.running_rows, batching.running_tokens = 48, 9000
    assert running_limits(batching, model, 128)[:2] == (48, 9000)


def test_on_a_gpu_the_running_batch_is_sized_from_its_free_memory(monkeypatch):
    model = SimpleNamespace(
        parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda", 0))]),
        get_input_embeddings=lambda: SimpleNamespace(weight=torch.empty(0, dtype=torch.bfloat16)),
        config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000),
    )
    monkeypatch.setattr(memory, "free_memory", lambda device: (125 * GiB, "cuda:0 (NVIDIA H200)"))
    rows, tokens, line = running_limits(BatchingConfig(), model, 128)
    assert (rows, tokens) == (512, 212638)
    assert line == ("komt-batch: running batch: up to 512 rows within 212638 tokens of KV cache (107.1 GiB with one layer's copy "
                    "while it is remade; 125.0 GiB free on cuda:0 (NVIDIA H200), headroom 10%; sized)")
    rows, tokens, line = running_limits(BatchingConfig(running_rows=64, memory_headroom=0.2), model, 128)
    assert rows == 64 and tokens < 212638 and line.endswith("headroom 20%; batching.running_rows set)")
