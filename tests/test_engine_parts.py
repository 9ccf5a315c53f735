"""The engine's pure helpers: prefill grouping, cache compaction order, the preallocated KV layer."""

import torch

from batch.engine import PreallocatedLayer, compact_order, left_pad, prefill_groups


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


def test_preallocated_layer_writes_in_place_and_compacts():
    like = torch.zeros(1, 2, 1, 3)
    layer = PreallocatedLayer(like, rows=4, capacity=5)
    prompt = torch.arange(4 * 2 * 2 * 3, dtype=torch.float32).reshape(4, 2, 2, 3)
    layer.write(0, 4, 1, prompt, -prompt)  # left padding in column 0
    layer.set_length(3)
    assert layer.get_seq_length() == 3 and torch.equal(layer.keys[:, :, 1:], prompt)
    assert torch.equal(layer.keys[:, :, 0], torch.zeros(4, 2, 3))
    step = torch.ones(4, 2, 1, 3)
    keys, values = layer.update(step, -step)
    assert keys.shape == (4, 2, 4, 3) and torch.equal(keys[:, :, 3:], step)
    before = layer.keys.clone()
    order = compact_order([0, 2, 3])  # row 1 leaves; row 3 moves into slot 1
    layer.batch_select_indices(torch.tensor(order))
    assert torch.equal(layer.keys, before[order])
    assert torch.equal(layer.values, -before[order])
    layer.batch_select_indices(torch.tensor([2, 0]))  # any other order: a gather
    assert torch.equal(layer.keys, before[order][[2, 0]])
