"""Decode attention over each row's own keys (batch.decode_attention): the sequences handed to the
kernel are the rows' (row, kv head) slices of the cache, of the rows' own lengths, so the output is
sdpa's with the mask; a kernel that is absent or wrong leaves sdpa in place; and the engine decodes
every row as alone with it. On the CPU the kernel is its contract in plain torch (reference_kernel);
the GPU test runs PyTorch's own."""

from __future__ import annotations

import pytest
import torch

from batch import decode_attention
from batch.decode_attention import READ_ONCE_ROWS, RowKeys, check, reads_once, reference_kernel, rows_attention, shared_attention
from batch.engine import Engine
from tests.test_exactness import MAX_NEW, load, prompts_40, reference, streamed


def masked_sdpa(query, key, value, lengths):
    group = query.shape[1] // key.shape[1]
    mask = (torch.arange(key.shape[2]) < lengths[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(query, key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
def test_each_rows_own_keys_give_sdpas_output_with_the_mask(heads, kv_heads):
    torch.manual_seed(0)
    rows, slots, width, columns, dim = 5, 7, 24, 19, 16  # the step reads slots [0, 5), columns [0, 19) of a wider buffer
    buffer_k, buffer_v = torch.randn(slots, kv_heads, width, dim), torch.randn(slots, kv_heads, width, dim)
    key, value = buffer_k[:rows, :, :columns], buffer_v[:rows, :, :columns]
    query = torch.randn(rows, heads, 1, dim)
    lengths = torch.tensor([1, 19, 6, 12, 2])
    seen = []

    def kernel(*args):
        seen.append(args[-2].tolist())  # seqlen_k
        return reference_kernel(*args)

    got = rows_attention(query, key, value, RowKeys(lengths.int(), kernel), dim**-0.5)
    torch.testing.assert_close(got, masked_sdpa(query, key, value, lengths), rtol=1e-5, atol=1e-5)
    assert seen == [lengths.tolist()]  # one sequence per row, in each kv head
    # the keys past a row's length are never read: garbage there changes nothing
    buffer_k[:, :, 12:] = float("nan")
    short = torch.tensor([1, 12, 6, 12, 2])
    torch.testing.assert_close(rows_attention(query, key, value, RowKeys(short.int(), reference_kernel), dim**-0.5),
                               masked_sdpa(query, key[:, :, :12], value[:, :, :12], short), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2)])
def test_a_shared_prefix_read_once_gives_sdpas_output_over_each_rows_copy(heads, kv_heads):
    """shared_attention over the prefix's columns (one copy) and each row's own: sdpa's output with
    the mask over the row's whole slot, the prefix's copy in its first columns."""
    torch.manual_seed(2)
    rows, prefix, own, dim = 5, 11, 9, 16
    shared_k, shared_v = torch.randn(1, kv_heads, prefix + 4, dim), torch.randn(1, kv_heads, prefix + 4, dim)  # (a longer node)
    own_k, own_v = torch.randn(rows, kv_heads, own, dim), torch.randn(rows, kv_heads, own, dim)
    query = torch.randn(rows, heads, 1, dim)
    lengths = torch.tensor([1, 9, 3, 5, 2])  # each row's own columns
    mask = (torch.arange(own) < lengths[:, None])[:, None, None, :]
    got = shared_attention(query, own_k, own_v, mask, shared_k[:, :, :prefix], shared_v[:, :, :prefix], dim**-0.5)
    slot_k = torch.cat([shared_k[:, :, :prefix].expand(rows, -1, -1, -1), own_k], dim=2)
    slot_v = torch.cat([shared_v[:, :, :prefix].expand(rows, -1, -1, -1), own_v], dim=2)
    torch.testing.assert_close(got, masked_sdpa(query, slot_k, slot_v, prefix + lengths), rtol=1e-5, atol=1e-5)


def test_the_prefix_is_read_once_where_it_pays():
    n = READ_ONCE_ROWS
    assert reads_once(n, 440, 520) and reads_once(32, 128, 256)
    assert not reads_once(n - 1, 440, 520)  # few rows: their copies are cheap to read (8 rows: 0.28 against 0.33 ms)
    assert not reads_once(32, 32, 332)  # a short prefix: most of what the step reads is the rows' own


def test_only_views_of_one_buffer_are_taken():
    query, key = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError):
        rows_attention(query, key.transpose(2, 3).contiguous().transpose(2, 3), key, RowKeys(torch.tensor([1, 2]).int(), reference_kernel), 1.0)
    with pytest.raises(ValueError):  # two positions per row: the kernel would not mask the later one from the earlier
        rows_attention(torch.randn(2, 2, 2, 8), key, key, RowKeys(torch.tensor([1, 2]).int(), reference_kernel), 1.0)


def test_a_step_whose_keys_are_not_slot_cache_views_gets_sdpa(capsys, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(decode_attention, "_warned", [])
    torch.manual_seed(1)
    query, key, value = torch.randn(3, 4, 1, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    key = key.transpose(2, 3).contiguous().transpose(2, 3)  # columns not D apart: not the slot cache's layout
    lengths = torch.tensor([1, 5, 3])
    mask = (torch.arange(5) < lengths[:, None])[:, None, None, :]
    module = SimpleNamespace(num_key_value_groups=2, is_causal=False)
    for _ in range(2):
        out, _ = decode_attention.attention(module, query, key, value, mask, scaling=8**-0.5, row_keys=RowKeys(lengths.int(), reference_kernel))
        torch.testing.assert_close(out, masked_sdpa(query, key, value, lengths), rtol=1e-5, atol=1e-5)
    assert capsys.readouterr().err.count("not slot-cache views; sdpa with the mask instead") == 1


def test_the_kernel_is_used_only_where_it_runs_and_matches_sdpa():
    ok, why = check(torch.device("cpu"), torch.float32)  # PyTorch's kernel is GPU-only
    assert not ok and why.startswith("its kernel does not run here (NotImplementedError"), why
    ok, why = check(torch.device("cpu"), torch.float32, kernel=lambda q, *args: torch.zeros_like(q))
    assert (ok, why) == (False, "its kernel's output is 100.00% from sdpa's (at most 2% allowed)")
    assert check(torch.device("cpu"), torch.float32, kernel=reference_kernel) == (True, "its kernel's output is 0.00% from sdpa's")
    assert check(torch.device("cpu"), torch.bfloat16, kernel=reference_kernel)[0]  # bf16 rounding is within the bound
    for heads, kv_heads, dim in [(32, 32, 128), (8, 1, 64), (6, 3, 16)]:  # a model's own shapes (Llama-2-7B: 32, 32, 128)
        assert check(torch.device("cpu"), torch.float32, heads, kv_heads, dim, kernel=reference_kernel)[0]


@pytest.mark.parametrize("variant", ["float32", "nf4+lora"])
def test_every_row_decodes_as_alone_reading_its_own_keys(variant):
    """Both kinds of decode step, in streams that refill places and remake the buffer with rows running."""
    sdpa = load(variant)
    ids = sdpa.tokenize(prompts_40()[:24])
    expected = [reference(sdpa, p) for p in ids]
    read = []  # (keys a row reads, columns the step reads) of every row

    def kernel(query, key, value, seqstart_q, seqstart_k, max_q, max_k, seqlen_k, scale):
        read.extend((n, max_k) for n in seqlen_k.tolist())
        return reference_kernel(query, key, value, seqstart_q, seqstart_k, max_q, max_k, seqlen_k, scale)

    for fixed_shapes in (False, True):
        engine = Engine(sdpa.model, sdpa.tokenizer, sdpa.settings, fixed_shapes=fixed_shapes, rows_kernel=kernel, extents=False)  # (extents: test_extents.py)
        for max_rows, budget, shuffle in [(8, 10**9, False), (6, 600, True)]:
            got = streamed(engine, ids, max_rows, budget, shuffle)
            mismatches = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got)) if e != g]
            assert not mismatches, (fixed_shapes, max_rows, budget, mismatches[:3])
    assert read and any(n < columns for n, columns in read) and all(1 <= n <= columns for n, columns in read)
    assert sdpa.model.config._attn_implementation == "sdpa"  # put back after every step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_pytorchs_kernel_reads_each_rows_own_keys(capsys):
    """PyTorch's kernel passes the check in bf16 and float32, and the tiny model on the GPU (float32)
    decodes with it, eagerly and replayed as graphs, from a cache of extents (prefilled packed) and of
    slots, the tokens of the sdpa steps."""
    from batch.config import GenerationSettings
    from batch.loading import load_model
    from tests.test_exactness import model_config

    device = torch.device("cuda:0")
    assert check(device, torch.bfloat16)[0] and check(device, torch.float32)[0]
    model, tokenizer = load_model(model_config("float32+lora", device_map="cuda:0"))
    settings = GenerationSettings(max_new_tokens=MAX_NEW, do_sample=False)
    plain = Engine(model, tokenizer, settings, cuda_graphs=False, fixed_shapes=False, extents=False)
    plain.step.rows_kernel = None  # sdpa with the mask
    ids = plain.tokenize(prompts_40())
    expected = streamed(plain, ids, 8, 10**9, shuffle=True)
    for graphs in (False, True):
        for extents in (None, False):  # (the default: each row in its own extent of one buffer; slots)
            engine = Engine(model, tokenizer, settings, cuda_graphs=graphs, extents=extents)
            assert engine.step.rows_kernel is decode_attention.efficient_attention_kernel and engine.extents == (extents is None)
            assert engine.packed_prefill == (extents is None)  # (the kernel's causal prefill checked too)
            assert streamed(engine, ids, 8, 10**9, shuffle=True) == expected
            assert streamed(engine, ids, 6, 700, shuffle=True) == expected  # (a budget that binds)
    err = capsys.readouterr().err
    assert "decode attention: each row reads its own keys only" in err and "prefill: the rows packed, none padded" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_a_prefix_every_row_shares_is_read_once(capsys, monkeypatch):
    """PyTorch's kernel, its log-sum-exps read by packed query (batch.decode_attention.packed_lse),
    passes the read-once check in bf16 and float32; the tiny model on the GPU (float32) then decodes
    the annotation shape reading the instruction once, eagerly and replayed as graphs, with the
    tokens of the steps that read every row's copy."""
    from batch import engine as engine_module
    from batch.config import GenerationSettings
    from batch.decode_attention import check_read_once
    from batch.loading import load_model
    from tests.test_exactness import model_config
    from tests.test_prefix import shared_prompts

    device = torch.device("cuda:0")
    assert check_read_once(device, torch.bfloat16)[0] and check_read_once(device, torch.float32)[0]
    monkeypatch.setattr(engine_module, "reads_once", lambda rows, shared, columns: True)  # (8 rows: under the rule)
    model, tokenizer = load_model(model_config("float32+lora", device_map="cuda:0"))
    settings = GenerationSettings(max_new_tokens=MAX_NEW, do_sample=False)
    copies = Engine(model, tokenizer, settings, cuda_graphs=False, read_once=False)
    ids = copies.tokenize(shared_prompts())
    expected = streamed(copies, ids, 8, 10**9, shuffle=True)
    for graphs in (False, True):
        engine = Engine(model, tokenizer, settings, cuda_graphs=graphs)
        assert engine.extents and engine.read_once
        assert streamed(engine, ids, 8, 10**9, shuffle=True) == expected and engine.shared_reads > 0
    assert "decode attention: a prefix every row shares is read once" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_prefill_attention_builds_no_cudnn_plans(capsys):
    """An engine on a GPU turns sdpa's cuDNN backend off (a host-side plan for every prefill group's
    shape): a prefill of groups of new shapes runs no cuDNN attention kernel."""
    from torch.profiler import ProfilerActivity, profile

    from batch.config import GenerationSettings
    from batch.loading import load_model
    from tests.test_exactness import model_config

    model, tokenizer = load_model(model_config("float32+lora", device_map="cuda:0"))
    engine = Engine(model, tokenizer, GenerationSettings(max_new_tokens=4, do_sample=False))
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert "prefill attention: sdpa without cuDNN" in capsys.readouterr().err
    ids = engine.tokenize(prompts_40())
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        streamed(engine, ids, 8, 10**9, shuffle=True)
    assert not [e.key for e in prof.key_averages() if "cudnn_attention" in e.key]
