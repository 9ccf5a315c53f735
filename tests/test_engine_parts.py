"""The engine's parts: prefill grouping, cache compaction order, the running batch's KV cache, row buckets."""

import pytest
import torch

from batch.config import GenerationSettings
from batch.decode_step import row_bucket
from batch.engine import Engine, Request, Requests, prefill_groups
from batch.kv_cache import (
    COUNT,
    POS,
    SEED,
    SlotCache,
    SlotLayer,
    compact_order,
    front_first,
    left_aligned,
)
from batch.prefix import aligned_columns, left_pad


def test_prefill_groups_bound_the_padding():
    lengths = [1000, 990, 700, 650, 640, 100, 99, 98, 8]
    groups = prefill_groups(lengths)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a < b for a, b in groups) and all(g[1] == h[0] for g, h in zip(groups, groups[1:]))
    for a, b in groups:
        real = sum(lengths[a:b])
        assert real >= 0.95 * (b - a) * lengths[a]
    assert prefill_groups([5, 5, 5]) == [(0, 3)]


def test_prefill_groups_count_the_shared_prefix_each_row_attends_to():
    """A group's cache holds its rows' past (a shared prefix's columns) beside their own tokens."""
    assert prefill_groups([60] * 200) == [(0, 136), (136, 200)]  # 136 x 60 <= 8192
    groups = prefill_groups([60] * 200, [400] * 200)
    assert groups[:2] == [(0, 17), (17, 34)] and all(b - a <= 17 for a, b in groups)  # 17 x (400 + 60) <= 8192
    assert prefill_groups([60] * 4, [0, 0, 400, 0]) == [(0, 4)]


def test_compact_order_moves_only_rows_beyond_the_new_size():
    assert compact_order([0, 2, 3, 4]) == [0, 4, 2, 3]  # slot 1 left; row 4 moves into it
    assert compact_order([2, 3]) == [2, 3]  # both beyond size 2: both move
    order = compact_order([1, 3, 4])
    assert sorted(order) == [1, 3, 4] and order[1] == 1  # a row already inside stays put


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_row_buckets_are_powers_of_two_up_to_the_slots():
    assert [row_bucket(n, 32) for n in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 32, 32]
    assert [row_bucket(n, 27) for n in (16, 17, 27)] == [16, 27, 27]


def test_slot_layer_writes_each_rows_column_in_place():
    like = torch.zeros(1, 2, 1, 3)
    layer = SlotLayer(like, slots=4, columns=6)
    prompt = torch.arange(3 * 2 * 2 * 3, dtype=torch.float32).reshape(3, 2, 2, 3)
    layer.write(0, 3, prompt, -prompt)
    at = torch.tensor([2, 3, 2])
    layer.read(3, 4, at)  # a step over slots 0-2 reads columns 0-3; rows write columns 2, 3, 2
    step = torch.ones(3, 2, 1, 3)
    keys, values = layer.update(step, -step)
    assert keys.shape == (3, 2, 4, 3) and torch.equal(values[:, :, :2], -prompt)
    assert torch.equal(keys[0, :, 2], step[0, :, 0]) and torch.equal(keys[1, :, 3], step[1, :, 0]) and torch.equal(keys[1, :, 2], torch.zeros(2, 3))
    assert keys.data_ptr() == layer.buf_k.data_ptr()  # a view of the buffer: nothing copied
    layer.read(4, 6, torch.tensor([5, 5, 5, 0]))  # the whole buffer, padding slot 3 included
    keys, _ = layer.update(2 * torch.ones(4, 2, 1, 3), -step.new_ones(4, 2, 1, 3))
    assert keys.shape == (4, 2, 6, 3) and torch.equal(layer.buf_k[:3, :, 5], 2 * torch.ones(3, 2, 3)) and torch.equal(layer.buf_k[3, :, 0], 2 * torch.ones(2, 3))
    assert torch.equal(layer.buf_k[:3, :, :2], prompt)


def test_left_aligned_moves_each_rows_prompt_to_the_front():
    keys = torch.tensor([[1.0, 2, 3, 4], [0, 0, 5, 6], [0, 0, 0, 7]])[:, None, :, None]  # left-padded to 4
    assert left_aligned(keys, front_first([4, 2, 1], 4, "cpu"))[:, 0, :, 0].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0], [7, 0, 0, 0]]


def kv(rows: int, length: int, value: float):
    t = torch.full((rows, 1, length, 2), value)
    return [(t, t)]


def test_slot_cache_rows_join_at_any_step_and_leave():
    c = SlotCache(model_config=None, device="cpu")
    like = [torch.zeros(1, 1, 1, 2)]
    c.reserve(2, need=7, like=like, budget=30, max_rows=8)  # prompts <= 4, 3 tokens each to come
    assert (c.slots, c.columns) == (4, 7)  # 30 // 7 slots
    c.add(0, [4, 2], [7, 5], kv(2, 4, 1.0), seeds=[11, 12])  # left-aligned: row 1's prompt is columns 0..1
    assert c.state[:, :2].tolist() == [[0, 0], [4, 2], [11, 12], [0, 0]] and (c.n, c.pos, c.used) == (2, [4, 2], 4)  # ids, pos, seed, count
    assert c.cache.layers[0].buf_k[:2, 0, :, 0].tolist() == [[1.0] * 4 + [0.0] * 3, [1.0] * 4 + [0.0] * 3]  # (row 1: its two, then its padding)
    inputs = c.step(2, whole=False)  # the running rows' columns [0, used]
    assert inputs.columns == 5 and inputs.state.shape == (4, 2) and inputs.at.shape == (2,)
    inputs.at.copy_(inputs.state[POS])  # (what the step does)
    c.cache.layers[0].update(torch.full((2, 1, 1, 2), 2.0), torch.full((2, 1, 1, 2), 2.0))
    c.state[POS, :2] += 1
    c.advance()
    assert c.pos == [5, 3] and c.cache.layers[0].buf_k[1, 0, :3, 0].tolist() == [1.0, 1.0, 2.0]
    c.select(compact_order([1]))  # row 0 leaves; row 1 moves into slot 0
    assert (c.n, c.pos, c.need) == (1, [3], [5]) and c.state[:, :1].tolist() == [[0], [3], [12], [0]]
    assert c.cache.layers[0].buf_k[0, 0, :3, 0].tolist() == [1.0, 1.0, 2.0]
    c.reserve(3, need=6, like=like, budget=30, max_rows=8)  # fits: no reallocation
    assert (c.slots, c.columns) == (4, 7)
    c.add(1, [3, 1], [6, 4], kv(2, 3, 5.0), seeds=[13, 14])  # two rows join, each from column 0
    assert c.pos == [3, 3, 1] and c.state[POS, :3].tolist() == [3, 3, 1]
    buffer = c.buffer
    c.reserve(5, need=6, like=like, budget=30, max_rows=8)  # more rows than slots: a narrower buffer, rows copied
    assert (c.slots, c.columns) == (5, 6) and c.buffer != buffer
    assert c.state[:, :3].tolist() == [[0, 0, 0], [3, 3, 1], [12, 13, 14], [0, 0, 0]]
    assert c.cache.layers[0].buf_k[:3, 0, :3, 0].tolist() == [[1.0, 1.0, 2.0], [5.0] * 3, [5.0] * 3]  # (row 2: its one column, then its group's padding)


def test_rows_of_one_shared_prefix_join_with_it_in_place_as_the_general_layout_puts_them():
    """A group whose rows all start from one 3-column prefix (the past), then suffixes of 2 and 1
    left-padded to 2: `fixed` copies the prefix as it is and moves only the suffixes, giving each
    slot what batch.prefix.aligned_columns' general layout gives it (prefix, suffix, then unread)."""
    group = torch.tensor([[1.0, 2, 3, 4, 5], [1, 2, 3, 0, 6]])[:, None, :, None]  # [prefix | pad.. suffix]
    slots = {}
    for fixed, source in ((3, front_first([2, 1], 2, "cpu")), (0, aligned_columns([3, 3], [2, 1], 3, 2))):
        c = SlotCache(model_config=None, device="cpu")
        c.reserve(2, need=7, like=[torch.zeros(1, 1, 1, 1)], budget=14, max_rows=2)
        c.add(0, [5, 4], [7, 6], [(group, -group)], seeds=[1, 2], source=source, fixed=fixed)
        slots[fixed] = c.cache.layers[0].buf_k[:2, 0, :, 0]
        assert torch.equal(c.cache.layers[0].buf_v[:2, 0, :, 0], -slots[fixed])
    assert slots[3][0, :5].tolist() == [1, 2, 3, 4, 5] and slots[3][1, :4].tolist() == [1, 2, 3, 6]
    assert torch.equal(slots[3][0, :5], slots[0][0, :5]) and torch.equal(slots[3][1, :4], slots[0][1, :4])


class EndsAt:
    """A decode step that computes nothing: row k (its seed) ends after answers[k] tokens."""

    captures = 0

    def __init__(self, answers: list[int]):
        self.answers = answers

    def pick(self, logits, state, seen=None):
        state[COUNT].add_(1)
        ends = torch.tensor([self.answers[s] if s < len(self.answers) else 1 for s in state[SEED].tolist()])
        return torch.stack([torch.zeros_like(ends), (state[COUNT] >= ends).long()])

    def pick_and_advance(self, logits, state, seen=None):
        out = self.pick(logits, state)
        state[POS].add_(1)
        return out

    def __call__(self, batch, rows, whole):
        return self.pick(None, batch.step(rows, whole).state)

    def release(self):
        pass


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_rows_join_while_a_long_answer_runs(fixed_shapes):
    """A row takes a free slot whatever the ages of the rows around it: one long answer does not
    keep the other places empty (the right-aligned cache before 2026-11-28 took no new row until
    the first rows' longest answer ended, since every row had to fit before the shared column)."""
    from tests.test_exactness import load, prompts_40

    tiny = load("float32")
    engine = Engine(tiny.model, tiny.tokenizer, GenerationSettings(max_new_tokens=24, do_sample=False, stop=[]), fixed_shapes=fixed_shapes)
    ids = sorted(engine.tokenize(prompts_40()[:20]), key=len, reverse=True)
    engine.step = EndsAt([24] + [2] * 19)  # the longest prompt's row answers 24 tokens, the others 2
    budget = 4 * (len(ids[0]) + 24)  # four rows of the longest prompt: no column to spare
    done = list(engine.stream(Requests(Request(i, p, i) for i, p in enumerate(ids)), 4, budget))
    assert sorted(k for k, _ in done) == list(range(20))
    assert [c.completion_tokens for _, c in sorted(done)] == [24] + [2] * 19
    assert engine.steps <= 24  # row 0's 23 decode steps (one more ahead): the other 19 rows came and went meanwhile


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("suffixes, past", [
    ([[5, 6, 7], [8, 9, 10]], []),  # nothing padded, no past: no mask (sdpa's causal kernel), as transformers chooses
    ([[5, 6, 7, 8], [9, 10], [11]], []),  # left padding
    ([[5, 6, 7], [8]], [3, 0]),  # a past for one row, none for the other
    ([[5, 6], [7, 8]], [2, 2]),  # the same past width, no padding: a mask still (past columns)
])
def test_prefill_mask_is_the_mask_transformers_builds(attention, suffixes, past):
    """batch.prefix.prefill_mask makes, without asking the device anything, the 4D mask transformers
    builds from the 2D one (which asks `padding_mask.all()` on the device first: a host sync per prefill
    on a GPU): what the first attention layer receives is the same both ways, values and dtype."""
    from transformers import DynamicCache

    from batch.prefix import past_inputs, prefill_mask
    from tests.test_exactness import load

    engine = load("float32")
    model = engine.model
    model.config._attn_implementation = attention
    width = max(past, default=0)
    past_mask = torch.zeros((len(suffixes), width), dtype=torch.long)
    for i, k in enumerate(past):
        past_mask[i, width - k :] = 1
    ids, mask, positions = past_inputs(suffixes, past_mask, pad_id=0)
    config = model.config
    heads, dim = getattr(config, "num_key_value_heads", config.num_attention_heads), config.hidden_size // config.num_attention_heads
    seen = []
    layer = next(m for name, m in model.named_modules() if name.endswith("layers.0.self_attn"))
    hook = layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    try:
        plain = not width and bool(mask.all())  # (the engine then hands no mask)
        for given in (mask, None if plain else prefill_mask(mask, width, None if attention == "sdpa" else torch.float32)):
            cache = DynamicCache(config=config)
            for i in range(config.num_hidden_layers):
                cache.update(torch.randn(len(suffixes), heads, width, dim), torch.randn(len(suffixes), heads, width, dim), i)
            engine._logits(ids, given, positions, cache)
    finally:
        hook.remove()
        model.config._attn_implementation = "sdpa"
    built, ours = seen
    if built is None:
        assert ours is None and plain
    else:
        assert ours is not None and ours.dtype == built.dtype and torch.equal(ours.expand_as(built), built)
