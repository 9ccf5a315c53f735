"""Greedy batched generation equals one-prompt-at-a-time `model.generate`, row for row.

Float32, float32 + LoRA, and NF4 + LoRA with float32 compute (4-bit weights resident, and
dequantized once), on the CPU, with both kinds of decode step: exact shapes (the running rows over
the columns they fill) and fixed shapes (a power-of-two bucket of rows, padding included, over the whole
buffer, one step ahead of the host: the GPU's step, without the graph). Padding, masking, position
ids, per-row stopping, rows leaving the batch and new rows joining it (rows moved between slots, the
cache reallocated) must not change a single token, nor where a row stops. Sampled rows draw the same
tokens alone, in a batch and in a shuffled stream.
"""

import random

import pytest
import torch

from batch import decode_step, kv_cache
from batch.config import GenerationSettings, ModelConfig
from batch.engine import Engine, Request, Requests, row_seed
from batch.kv_cache import POS
from batch.loading import load_model
from batch.plan import plan_batches
from batch.stops import CONTEXT_TOKENS, answer_text, find_stop, settled
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
    """The prompt alone through `model.generate` (with transformers' repetition penalty and minimum
    length, EOS and the stop tokens as its eos_token_id): the response rule on its output, and where
    the engine must stop (EOS or a stop token, or the first token after which the rule finds a stop word)."""
    model, s = engine.model, engine.settings
    ends = sorted({engine.tokenizer.eos_token_id, model.generation_config.eos_token_id, *s.stop_token_ids})
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=ends,
                         repetition_penalty=s.repetition_penalty, min_new_tokens=s.min_new_tokens)
    generated = out[0, len(prompt_ids) :].tolist()
    context = prompt_ids[-CONTEXT_TOKENS:]

    def text(n):  # the answer's text after n tokens, as far as it will stay as decoded
        return settled(answer_text(engine.decode, context, generated[:n]))

    after = len(text(s.min_new_tokens)) if s.min_new_tokens else 0
    stop_at = (i + 1 for i in range(len(generated)) if generated[i] in ends or (i >= s.min_new_tokens and find_stop(text(i + 1), s.stop, after)))
    generated = generated[: next(stop_at, len(generated))]
    c = engine.finish(prompt_ids, generated)
    return c.response, c.finish_reason, len(generated), c.stop_reason


def result(c):
    return c.response, c.finish_reason, c.completion_tokens, c.stop_reason


def batched(engine: Engine, ids: list[list[int]], batch_size: int, seeds=None):
    results = {}
    for batch in plan_batches([len(i) for i in ids], MAX_NEW, batch_size, 10**6):
        for row, c in zip(batch, engine.generate([ids[r] for r in batch], [seeds[r] if seeds else 0 for r in batch])):
            results[row] = result(c)
    return [results[r] for r in range(len(ids))]


VARIANTS = {  # name: (quantization, adapter, model.weights, model.merge_adapter)
    "float32": ("none", False, "auto", False),
    "float32+lora": ("none", True, "auto", False),
    "nf4+lora": ("nf4", True, "nf4", False),
    "dequantized+lora": ("nf4", True, "dequantized", False),
    "merged+lora": ("nf4", True, "dequantized", True),  # the adapter merged into the dequantized weights
    "nf4": ("nf4", False, "nf4", False),  # (without the adapter: only to see that the adapter matters)
}


def model_config(variant: str, device_map: str = "cpu") -> ModelConfig:
    quantization, adapter, weights, merge = VARIANTS[variant]
    return ModelConfig(
        base=str(TINY / "base"),
        adapter=str(TINY / "adapter") if adapter else None,
        quantization=quantization,
        compute_dtype="float32",
        device_map=device_map,
        weights=weights,
        merge_adapter=merge,
    )


def load(variant: str, fixed_shapes: bool = False, **generation) -> Engine:
    cfg = model_config(variant)
    settings = GenerationSettings(**{"max_new_tokens": MAX_NEW, "do_sample": False, **generation})
    return Engine(*load_model(cfg), settings, fixed_shapes=fixed_shapes)


def with_steps(engine: Engine, fixed_shapes: bool) -> Engine:
    """The same model and settings with the other kind of decode step."""
    return Engine(engine.model, engine.tokenizer, engine.settings, fixed_shapes=fixed_shapes)


def streamed(engine: Engine, ids: list[list[int]], max_rows: int, budget: int, shuffle: bool = False, seeds=None):
    """The way `run` generates: one stream, longest first; finished rows' places are refilled.
    Shuffled, longer prompts join later, so the buffer must be remade wider with rows running."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    if shuffle:
        random.Random(5).shuffle(order)
    results = {}
    for row, c in engine.stream(Requests(Request(i, ids[i], seeds[i] if seeds else 0) for i in order), max_rows, budget):
        assert row not in results
        results[row] = result(c)
    return [results[r] for r in range(len(ids))]


# The generation options beside the stop words (stop_token_ids: 412 is "롤", frequent in the tiny
# model's answers), as transformers' generate has them: every row still stops where it stops alone.
OPTIONS = dict(stop_token_ids=[412], min_new_tokens=5, repetition_penalty=1.3, include_stop_str_in_output=True)


@pytest.mark.parametrize("variant, options", [(v, {}) for v in ["float32", "float32+lora", "nf4+lora", "dequantized+lora", "merged+lora"]]
                         + [("float32", OPTIONS)], ids=lambda x: "options" if x == OPTIONS else "" if x == {} else x)
def test_batched_equals_single_prompt_generate(variant, options, monkeypatch):
    engine = load(variant, **options)
    ids = engine.tokenize(prompts_40())
    expected = [reference(engine, p) for p in ids]

    copies = []  # (rows, columns) copied into a new buffer with rows running, and (rows, None) moved between slots
    copy_into, move = kv_cache.SlotLayer.copy_into, kv_cache.SlotLayer.move
    monkeypatch.setattr(kv_cache.SlotLayer, "copy_into", lambda self, into, n, columns: (copies.append((n, columns)), copy_into(self, into, n, columns))[1])
    monkeypatch.setattr(kv_cache.SlotLayer, "move", lambda self, src, dst, columns: (copies.append((len(src), None)), move(self, src, dst, columns))[1])
    shapes = []  # (rows computed, rows running, slots, columns read, columns) of every decode step
    inside = []  # every running row's position inside the columns read (the step's clamp is for padding rows only)
    step = decode_step.DecodeStep._run
    monkeypatch.setattr(decode_step.DecodeStep, "_run", lambda self, inputs, batch: (shapes.append((inputs.state.shape[1], batch.n, batch.slots, inputs.columns, batch.columns)), inside.append(bool((inputs.state[POS, : batch.n] < inputs.columns).all())), step(self, inputs, batch))[-1])
    longest = max(map(len, ids))
    streams = [(8, 10**9, False), (5, 4 * (longest + MAX_NEW), False), (6, 10**9, True), (6, 700, True)]
    for fixed in (False, True):
        engine = with_steps(engine, fixed)
        got = batched(engine, ids, batch_size=8)
        mismatches = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got)) if e != g]
        assert not mismatches, (fixed, mismatches[:3])
        # (to save time, the fixed-shape steps of 4-bit weights and the dequantized ones, which are a
        # plain Linear like float32's, take only the stream that remakes the buffer with rows running)
        few = (fixed and variant == "nf4+lora") or variant in ("dequantized+lora", "merged+lora")
        for max_rows, budget, shuffle in streams[-1:] if few else streams:
            got = streamed(engine, ids, max_rows, budget, shuffle)
            mismatches = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got)) if e != g]
            assert not mismatches, (fixed, max_rows, budget, mismatches[:3])
        if fixed:  # rows padded to a power of two (e.g. a bucket of 8 with 5 running), the whole buffer read
            assert all(rows >= n and (rows & (rows - 1) == 0 or rows == slots) and read == columns for rows, n, slots, read, columns in shapes)
            assert (8, 5) in {(rows, n) for rows, n, *_ in shapes}
        else:  # the running rows over their columns
            assert all(rows == n and read <= columns for rows, n, slots, read, columns in shapes)
            assert any(read < columns for *_, read, columns in shapes)
        shapes.clear()
    assert all(inside)
    assert any(columns is None for _, columns in copies)  # rows moved into the places of finished ones
    if variant == "float32":  # budget 700, shuffled: with this model's answer lengths,
        assert any(n and columns for n, columns in copies)  # a new buffer was made with rows running
    reasons = {r for _, r, *_ in expected}
    assert "stop" in reasons or "eos" in reasons  # rows really stop at different points
    if options:  # on a stop token and on a stop word
        assert {"412", "###"} <= {why for *_, why in expected}
    assert "length" in reasons or variant in ("nf4+lora", "dequantized+lora", "merged+lora")


def test_eager_attention_takes_an_additive_mask():
    engine = load("float32")
    engine.model.set_attn_implementation("eager")
    ids = engine.tokenize(prompts_40()[:12])
    expected = [reference(engine, p) for p in ids]
    for fixed in (False, True):
        assert streamed(with_steps(engine, fixed), ids, 5, 10**9, shuffle=True) == expected


@pytest.mark.parametrize("options", [{}, OPTIONS], ids=["card", "options"])
def test_a_sampled_row_draws_the_same_tokens_alone_in_a_batch_and_in_a_stream(options):
    card = dict(do_sample=True, temperature=0.9, top_p=0.7, top_k=100)  # the model card's settings
    engine = load("float32+lora", **card, **options)
    ids = engine.tokenize(prompts_40()[:16])
    seeds = [row_seed(0, f"row-{i}") for i in range(len(ids))]
    alone = [result(engine.generate([p], [s])[0]) for p, s in zip(ids, seeds)]
    assert len({r for r in alone}) > 8 and {r for _, r, *_ in alone} != {"length"}
    greedy = batched(load("float32+lora", **options), ids, 16)
    assert sum(a != g for a, g in zip(alone, greedy)) > 4  # really sampled
    for fixed in (False, True):
        engine = with_steps(engine, fixed)
        assert batched(engine, ids, 16, seeds) == alone
        assert streamed(engine, ids, 5, 10**9, shuffle=True, seeds=seeds) == alone
        assert streamed(engine, ids, 3, 600, seeds=seeds) == alone


def test_adapter_is_applied():
    plain, tuned = load("nf4"), load("nf4+lora")
    ids = plain.tokenize(prompts_40()[:9])
    with_adapter = batched(tuned, ids, 8)
    without = batched(plain, ids, 8)
    assert with_adapter != without
    answers = [r["reference"] for r in seed_rows()]

    def begins_answer(resp, ans):  # 24 tokens may end inside a character or inside "<|end|>"
        resp = resp.rstrip("\ufffd").removesuffix("<")
        return len(resp) > 10 and ans.startswith(resp)

    assert sum(begins_answer(resp, ans) for (resp, *_), ans in zip(with_adapter, answers)) == 9
    assert sum(begins_answer(resp, ans) for (resp, *_), ans in zip(without, answers)) == 0


def test_a_failing_request_source_is_not_taken_for_a_generation_failure():
    """The caller's iterator raising must reach the caller as is: not be retried row by row."""
    from batch.engine import SafeGenerator

    engine = load("float32")
    ids = engine.tokenize(prompts_40()[:4])

    def requests():
        yield from (Request(i, p, 0) for i, p in enumerate(ids))
        raise KeyError("the input went away")

    with pytest.raises(KeyError, match="the input went away"):
        list(SafeGenerator(engine, 2, 10**6, MAX_NEW).stream(requests()))
