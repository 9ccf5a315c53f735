"""Greedy batched generation equals one-prompt-at-a-time `model.generate`, row for row.

Float32 and NF4 + LoRA with float32 compute, on the CPU: padding, masking, position ids, per-row
stopping, rows leaving the batch and new rows joining it (the cache window moved, the cache
reallocated) must not change a single token.
"""

import random

import pytest
import torch

from batch.config import GenerationSettings, ModelConfig
from batch import kv_cache
from batch.engine import Engine, Request, Requests
from batch.loading import load_model
from batch.plan import plan_batches
from tests.conftest import TINY, seed_rows

TEMPLATE = "### instruction: {}\n\n### Response:"
MAX_NEW = 24


def prompts_40() -> list[str]:
    seeds = [r["instruction"] for r in seed_rows()]
    extra = [
        "안녕", "Hi", "😀", "🎉🎉🎉 파티!", "?", "a", "한국", "Why?",
        "What is the capital of Korea?", "Explain ### in Markdown.", "Use <|end|> to finish.",
        "Start <s> token inside", "line one\nline two\nline three", "\n\n\n", "tabs\tand  spaces",
        "자동차 검사 ### 기간", "누전차단기<|end|>", "Mixed 한국어 and English with emoji 🚗",
        "Numbers 1 2 3 4 5 6 7 8 9 10", "long " * 40, "아주 긴 질문입니다. " * 12,
        "The quick brown fox jumps over the lazy dog.", "협력공인중개사", "###",
        "Response:", "instruction: nested", "{braces} are fine", "끝",
        "A very short one", "Emoji only: 🍎🍊🍋🍇🍉", "마지막 질문입니다?",
    ]
    out = seeds + extra
    assert len(out) >= 40
    return [TEMPLATE.format(p) for p in out]


def reference(engine: Engine, prompt_ids: list[int]):
    model = engine.model
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW, do_sample=False)
    c = engine.finish(len(prompt_ids), out[0, len(prompt_ids) :].tolist())
    return c.response, c.finish_reason


def batched(engine: Engine, ids: list[list[int]], batch_size: int):
    results = {}
    for batch in plan_batches([len(i) for i in ids], MAX_NEW, batch_size, 10**6):
        for row, c in zip(batch, engine.generate([ids[r] for r in batch], [0] * len(batch))):
            results[row] = (c.response, c.finish_reason)
    return [results[r] for r in range(len(ids))]


def load(quantization: str, adapter: bool) -> Engine:
    cfg = ModelConfig(
        base=str(TINY / "base"),
        adapter=str(TINY / "adapter") if adapter else None,
        quantization=quantization,
        compute_dtype="float32",
        device_map="cpu",
    )
    settings = GenerationSettings(max_new_tokens=MAX_NEW, do_sample=False)
    return Engine(*load_model(cfg), settings)


def streamed(engine: Engine, ids: list[list[int]], max_rows: int, budget: int, shuffle: bool = False):
    """The way `run` generates: one stream, longest first; finished rows' places are refilled.
    Shuffled, longer prompts join later, so the window must move right and the buffer grow."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    if shuffle:
        random.Random(5).shuffle(order)
    results = {}
    for row, c in engine.stream(Requests(Request(i, ids[i], 0) for i in order), max_rows, budget):
        assert row not in results
        results[row] = (c.response, c.finish_reason)
    return [results[r] for r in range(len(ids))]


@pytest.mark.parametrize("quantization, adapter", [("none", False), ("none", True), ("nf4", True)])
def test_batched_equals_single_prompt_generate(quantization, adapter, monkeypatch):
    engine = load(quantization, adapter)
    ids = engine.tokenize(prompts_40())
    expected = [reference(engine, p) for p in ids]
    got = batched(engine, ids, batch_size=8)
    mismatches = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got)) if e != g]
    assert not mismatches, mismatches[:3]

    moves = []  # (rows in the batch, in place?) for every move of the cache window
    original = kv_cache.SlotCache._move_window
    monkeypatch.setattr(kv_cache.SlotCache, "_move_window", lambda self, to, layers=None, mask=None: (moves.append((self.n, layers is None)), original(self, to, layers, mask))[1])
    longest = max(map(len, ids))
    for max_rows, budget, shuffle in [(8, 10**9, False), (5, 4 * (longest + MAX_NEW), False), (6, 10**9, True), (6, 700, True)]:
        got = streamed(engine, ids, max_rows, budget, shuffle)
        mismatches = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got)) if e != g]
        assert not mismatches, (max_rows, budget, mismatches[:3])
    assert any(n and in_place for n, in_place in moves)  # the window moved with rows running
    if (quantization, adapter) == ("none", False):  # budget 700, shuffled: with this model's answer lengths,
        assert any(n and not in_place for n, in_place in moves)  # a new buffer was made with rows running
    reasons = {r for _, r in expected}
    assert "stop" in reasons or "eos" in reasons  # rows really stop at different points
    assert "length" in reasons or quantization == "nf4"


def test_adapter_is_applied():
    plain, tuned = load("nf4", False), load("nf4", True)
    ids = plain.tokenize(prompts_40()[:9])
    with_adapter = batched(tuned, ids, 8)
    without = batched(plain, ids, 8)
    assert with_adapter != without
    answers = [r["reference"] for r in seed_rows()]

    def begins_answer(resp, ans):  # 24 tokens may end inside a character or inside "<|end|>"
        resp = resp.rstrip("\ufffd").removesuffix("<")
        return len(resp) > 10 and ans.startswith(resp)

    assert sum(begins_answer(resp, ans) for (resp, _), ans in zip(with_adapter, answers)) == 9
    assert sum(begins_answer(resp, ans) for (resp, _), ans in zip(without, answers)) == 0


def test_a_failing_request_source_is_not_taken_for_a_generation_failure():
    """The caller's iterator raising must reach the caller as is: not be retried row by row."""
    from batch.engine import SafeGenerator

    engine = load("none", False)
    ids = engine.tokenize(prompts_40()[:4])

    def requests():
        yield from (Request(i, p, 0) for i, p in enumerate(ids))
        raise KeyError("the input went away")

    with pytest.raises(KeyError, match="the input went away"):
        list(SafeGenerator(engine, 2, 10**6, MAX_NEW).stream(requests()))
