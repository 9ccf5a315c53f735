"""The engine's parts: prefill grouping, cache compaction order, the running batch's KV cache, row buckets."""

import torch

from batch.decode_step import row_bucket
from batch.engine import left_pad, prefill_groups
from batch.kv_cache import POS, SlotCache, SlotLayer, compact_order


def test_prefill_groups_bound_the_padding():
    lengths = [1000, 990, 700, 650, 640, 100, 99, 98, 8]
    groups = prefill_groups(lengths)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a < b for a, b in groups) and all(g[1] == h[0] for g, h in zip(groups, groups[1:]))
    for a, b in groups:
        real = sum(lengths[a:b])
        assert real >= 0.95 * (b - a) * lengths[a]
    assert prefill_groups([5, 5, 5]) == [(0, 3)]


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


def test_slot_layer_writes_in_place():
    like = torch.zeros(1, 2, 1, 3)
    layer = SlotLayer(like, slots=4, columns=6)
    prompt = torch.arange(3 * 2 * 2 * 3, dtype=torch.float32).reshape(3, 2, 2, 3)
    layer.write(0, 3, 1, prompt, -prompt)
    column = torch.tensor([2])
    layer.read(3, 1, 4, column)  # a step over slots 0-2 reads columns 1-3 and writes column 3
    step = torch.ones(3, 2, 1, 3)
    keys, values = layer.update(step, -step)
    assert keys.shape == (3, 2, 3, 3) and torch.equal(keys[:, :, 2:], step) and torch.equal(values[:, :, :2], -prompt)
    assert keys.data_ptr() == layer.buf_k[:, :, 1:].data_ptr()  # a view of the buffer: nothing copied
    layer.read(4, 0, 6, column.fill_(4))  # the whole buffer, padding slot 3 included: column 4
    keys, _ = layer.update(2 * torch.ones(4, 2, 1, 3), -step.new_ones(4, 2, 1, 3))
    assert keys.shape == (4, 2, 6, 3) and torch.equal(layer.buf_k[:, :, 4], 2 * torch.ones(4, 2, 3))
    assert torch.equal(layer.buf_k[:3, :, 1:3], prompt) and torch.equal(layer.buf_k[:3, :, 3:4], step)


def kv(rows: int, length: int, value: float):
    t = torch.full((rows, 1, length, 2), value)
    return [(t, t)]


def test_slot_cache_rows_join_leave_and_the_window_moves():
    c = SlotCache(model_config=None, device="cpu")
    like = [torch.zeros(1, 1, 1, 2)]
    c.reserve(2, width=4, room=3, like=like, budget=30, max_rows=3)  # prompts <= 4, 3 tokens each to come
    assert (c.slots, c.columns, c.lo, c.cur) == (3, 10, 4, 4)  # 4 + 3 + 3 more (see reserve); 30 // 10 slots
    c.add(0, [4, 2], kv(2, 4, 1.0), seeds=[11, 12])  # right-aligned: row 1's prompt is columns 2..3
    assert c.mask[:2, :6].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]]
    assert c.state[:, :2].tolist() == [[0, 0], [4, 2], [11, 12], [0, 0]] and (c.n, c.lo) == (2, 0)  # ids, pos, seed, count
    inputs = c.step(2, whole=False)  # the window [lo, cur]; the step writes column cur = 4
    assert inputs.mask.shape == (2, 5) and inputs.column.tolist() == [4] and inputs.state.shape == (4, 2)
    inputs.mask.index_fill_(1, inputs.column, True)  # (what the step does)
    c.cache.layers[0].update(torch.full((2, 1, 1, 2), 2.0), torch.full((2, 1, 1, 2), 2.0))
    c.state[POS, :2] += 1
    c.advance()
    assert c.mask[:2, :6].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0]]
    c.select(compact_order([1]))  # row 0 leaves; row 1 moves into slot 0; the window starts at its prompt
    assert (c.n, c.lo, c.cur) == (1, 2, 5) and c.state[:, :1].tolist() == [[0], [3], [12], [0]]
    c.reserve(3, width=3, room=3, like=like, budget=30, max_rows=3)  # fits: no reallocation, no move
    assert (c.slots, c.columns, c.lo, c.cur) == (3, 10, 2, 5)
    c.add(1, [3, 1], kv(2, 3, 5.0), seeds=[13, 14])  # two rows join at the current column
    assert c.mask[:3, 2:5].tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1]] and c.start == [2, 2, 4]
    layer = c.cache.layers[0]
    for _ in range(6):  # the sixth step finds cur at the buffer's end: the window moves to column 0 first
        inputs = c.step(3, whole=True)  # the whole buffer: the step writes column cur of it
        assert inputs.mask.shape == (3, 10) and inputs.column.tolist() == [c.cur]
        inputs.mask.index_fill_(1, inputs.column, True)
        layer.update(torch.full((3, 1, 1, 2), 7.0), torch.full((3, 1, 1, 2), 7.0))
        c.state[POS, :3] += 1
        c.advance()
    assert (c.lo, c.cur, c.start) == (0, 9, [0, 0, 2])
    assert c.mask[:3].tolist() == [[1] * 9 + [0], [1] * 9 + [0], [0, 0] + [1] * 7 + [0]]
    assert layer.buf_k[0, 0, :9, 0].tolist() == [1.0, 1.0, 2.0] + [7.0] * 6  # prompt, its token, six steps
    assert layer.buf_k[1, 0, :9, 0].tolist() == [5.0] * 3 + [7.0] * 6
    assert c.state[POS, :3].tolist() == [9, 9, 7]
    buffer = c.buffer
    c.reserve(4, width=9, room=3, like=like, budget=60, max_rows=4)  # more rows than slots: a new buffer, window copied
    assert (c.slots, c.columns, c.lo, c.cur) == (4, 15, 0, 9) and c.buffer != buffer
    assert c.state[:, :3].tolist() == [[0, 0, 0], [9, 9, 7], [12, 13, 14], [0, 0, 0]]
    assert c.mask[:3, :9].tolist() == [[1] * 9, [1] * 9, [0, 0] + [1] * 7]
    assert c.cache.layers[0].buf_k[1, 0, :9, 0].tolist() == [5.0] * 3 + [7.0] * 6
