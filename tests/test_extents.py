"""A KV cache of extents (batch.kv_cache.ExtentCache): each row holds only its own need, a range of
one buffer's columns, where decode attention reads each row's own keys (a GPU's kernel; on the CPU
its contract, reference_kernel); and the packed prefill into it (the joining rows' tokens in one
sequence, none padded: batch.decode_attention.packed_attention).

Rows still decode exactly as alone (float32 and NF4 + LoRA, both kinds of decode step, packed or
padded prefill, refills, budgets that bind, shuffled widths, the generation options, shared
prefixes, sampling); a row computed past its end and padding rows write only their own columns;
and a token budget holds the rows' needs, not rows x the widest need: more rows in flight and fewer
steps where a wide row runs.
"""

import pytest
import torch

from batch.bench.measuring import OpCounter
from batch.config import GenerationSettings
from batch import decode_step
from batch import engine as engine_module
from batch.decode_attention import READ_ONCE_ROWS, check_packed, check_read_once, packed_lse, reference_kernel
from batch.decode_step import DecodeStep
from batch.engine import PREFILL_GROUP_TOKENS, Engine, Request, Requests, packed_chunks
from batch.kv_cache import COUNT, LIMIT, POS, START, ExtentCache, Extents
from batch.prefix import Prefixes
from tests.test_decode_step import StandInGraph, replayed_by_stand_ins
from tests.test_engine_parts import EndsAt
from tests.test_exactness import MAX_NEW, OPTIONS, load, prompts_40, reference, result, streamed
from tests.test_prefix import shared_prompts


def extents_of(engine: Engine, fixed_shapes: bool, packed: bool | None = None) -> Engine:
    """The same model and settings, decoding through a cache of extents (attention: the kernel's contract)."""
    return Engine(engine.model, engine.tokenizer, engine.settings, fixed_shapes=fixed_shapes, rows_kernel=reference_kernel, extents=True,
                  packed_prefill=packed)


@pytest.mark.parametrize("steps, holes", [
    ([("take", 4, 0), ("take", 3, 4), ("take", 5, None)], [[7, 10]]),  # first fit; 5 columns do not fit the 3 left
    ([("take", 4, 0), ("take", 3, 4), ("give", 0, 4), ("take", 2, 0)], [[2, 4], [7, 10]]),  # a hole before a taken range
    ([("take", 4, 0), ("take", 3, 4), ("give", 0, 4), ("give", 4, 3)], [[0, 10]]),  # ranges given back merge with both neighbours
    ([("take", 3, 0), ("take", 3, 3), ("take", 4, 6), ("give", 3, 3), ("give", 6, 4)], [[3, 10]]),  # ... with the hole after
    ([("take", 10, 0), ("take", 1, None), ("give", 0, 10), ("take", 10, 0)], []),  # exactly full
])
def test_extents_take_the_first_hole_that_fits_and_merge_what_is_given_back(steps, holes):
    extents = Extents(10)
    for op, a, b in steps:
        if op == "take":
            assert extents.take(a) == b
        else:
            extents.give(a, b)
    assert extents.holes == holes and extents.free == sum(end - start for start, end in holes)


def test_the_capacity_is_the_budget_and_is_remade_only_with_no_row_placed():
    cache = ExtentCache(load("float32").model.config, "cpu")
    assert cache.place([5, 4], budget=12, max_rows=8) == [0, 5] and cache.tokens == 12
    assert cache.place([4], budget=12, max_rows=8) is None  # 3 columns left: all or none, nothing taken
    assert cache.extents.free == 3
    cache.give_back([0, 5], [5, 4])
    assert cache.place([20], budget=12, max_rows=8) == [0] and cache.tokens == 20  # nothing placed: made for the wider row
    unbounded = ExtentCache(load("float32").model.config, "cpu")
    unbounded.place([5], budget=10**12, max_rows=8)
    assert unbounded.tokens == 8 * 2048  # at most max_rows of the model's longest sequence
    huge = ExtentCache(load("float32").model.config, "cpu")
    huge.place([5], budget=10**12, max_rows=10**6)
    assert huge.tokens == 2**31 // 32 - 2**16  # ... and within the kernel's 32-bit strides (a kv head: columns x 32 elements)


def test_a_row_computed_past_its_end_and_padding_rows_write_only_their_own_columns():
    """Two rows side by side (needs 3 and 2: columns 0-2 and 3-4), the first computed one step past
    its end (as a fixed-shape step launched ahead of the host does), two padding slots: each writes
    the column of its own position -- the first row its last, padding its scratch column."""
    config = load("float32").model.config
    cache = ExtentCache(config, "cpu")
    starts = cache.place([3, 2], budget=5, max_rows=4)
    like = torch.zeros(1, 1, 1, 2)
    cache.reserve(2, 3, [like], budget=5, max_rows=4)
    keys = torch.full((2, 1, 2, 2), -1.0)  # each row's prompt: 2 columns, marked -1
    cache.add(0, [2, 1], [3, 2], [(keys, keys)], seeds=[0, 0], starts=starts)
    cache.state[POS, 0] = 3  # past its need (3 columns: positions 0-2)
    written = []

    def forward(ids, mask, positions, kv, row_keys, shared):
        rows = ids.shape[0]
        values = torch.arange(1.0, rows + 1)[:, None, None, None].expand(rows, 1, 1, 2)  # row i writes i + 1
        written.append((positions[:, 0].tolist(), row_keys.lengths.tolist(), row_keys.starts.tolist()))
        kv.layers[0].update(values, values)
        return torch.zeros(rows, 8)

    step = DecodeStep(forward, GenerationSettings(max_new_tokens=8, do_sample=False), [], "cpu", None, graphs=False, rows_kernel=reference_kernel)
    step(cache, 4, whole=True)
    buffer = cache.cache.layers[0].buf_k[0, 0, :, 0].tolist()
    assert buffer == [-1, -1, 1, -1, 2, 0, 0, 3, 4]  # row 0 its last column, row 1 its column 1, padding slots 2-3 scratch 7-8 (5 + slot)
    assert written == [([2, 1, 0, 0], [3, 2, 1, 1], [0, 3, 7, 8, 0])]
    assert cache.state[COUNT, :2].tolist() == [1, 1] and cache.state[[START, LIMIT], 2:].tolist() == [[7, 8], [0, 0]]


@pytest.mark.parametrize("variant, options", [("float32", {}), ("nf4+lora", {}), ("float32", OPTIONS)], ids=["float32", "nf4+lora", "options"])
def test_every_row_decodes_as_alone_from_its_own_extent(variant, options, monkeypatch):
    engine = load(variant, **options)
    ids = engine.tokenize(prompts_40())
    expected = [reference(engine, p) for p in ids]
    longest = max(map(len, ids)) + MAX_NEW
    placed = []  # (rows placed or None, a capacity made anew for a wider row) of every placing
    place = ExtentCache.place

    def counted(cache, *args):
        before = cache.extents
        starts = place(cache, *args)
        placed.append((starts, before is not None and cache.extents is not before))
        return starts

    monkeypatch.setattr(ExtentCache, "place", counted)
    # unbounded; shuffled (wider rows come later) within a budget under 2 of the longest rows, and under 1
    streams = [(8, 10**9, False), (6, 2 * longest - 1, True), (4, longest - 5, True)]
    for fixed, packed in [(False, True), (True, True), (False, False), (True, False)]:
        e = extents_of(engine, fixed, packed)
        for max_rows, budget, shuffle in streams[1:] if (fixed or not packed) and variant != "float32" else streams:
            got = streamed(e, ids, max_rows, budget, shuffle)
            mismatches = [(i, x, y) for i, (x, y) in enumerate(zip(expected, got)) if x != y]
            assert not mismatches, (fixed, packed, max_rows, budget, mismatches[:3])
        if packed:  # (nothing shared in these prompts) every prompt token computed once, none padded
            assert e.padded_prompt_tokens == e.prefilled_prompt_tokens
            assert 0 < e.mixed_steps < e.steps  # rows that ran took some decode steps in a join's prefill forward
    assert any(r is None for r, _ in placed)  # rows waited for room
    assert any(remade for _, remade in placed)  # a row wider than the budget, alone


@pytest.mark.parametrize("variant", ["float32", "nf4+lora"])
@pytest.mark.parametrize("packed", [True, False])
def test_shared_prefixes_copied_into_extents_give_the_reference_outputs(variant, packed):
    engine = load(variant)
    ids = engine.tokenize(shared_prompts())
    expected = [reference(engine, p) for p in ids]
    longest = max(map(len, ids))
    for fixed, (max_rows, budget, shuffle) in [(False, (8, 10**9, False)), (True, (5, 4 * (longest + MAX_NEW), True)),
                                                (False, (3, 3 * (longest + MAX_NEW), False))]:
        e = extents_of(engine, fixed, packed)
        e.prefixes = Prefixes(min_saved=0, saved_share=0)  # the document too: two levels
        got = streamed(e, ids, max_rows, budget, shuffle)
        mismatches = [(i, x, y) for i, (x, y) in enumerate(zip(expected, got)) if x != y]
        assert not mismatches, (fixed, max_rows, budget, mismatches[:3])
        total = sum(map(len, ids))  # the instruction computed once a stream, kept beside the extents where the budget binds
        assert e.shared_prompt_tokens > 0.6 * total and e.prefilled_prompt_tokens < 0.4 * total, (e.shared_prompt_tokens, e.prefilled_prompt_tokens, total)


@pytest.mark.parametrize("variant", ["float32", "nf4+lora"])
def test_steps_over_extents_that_read_the_shared_prefix_once_give_the_reference_outputs(variant, monkeypatch):
    """Where every running row starts from one shared prefix still held, a decode step over extents
    reads its columns once for all rows, from the prefix's own keys and values, then each row's own
    columns after them; the kernel's log-sum-exps make one softmax of the two (on the CPU its
    contract, reference_kernel). By the rule (16 rows and more of the instruction alone), and at
    every step it can (the rule forced): eager and fixed-shape steps, packed and padded prefill,
    refills, budgets that drop the prefix, rows of another prefix beside them (those steps read
    every row's copy)."""
    engine = load(variant)
    ids = engine.tokenize(shared_prompts())
    expected = [reference(engine, p) for p in ids]
    longest = max(map(len, ids))
    one_prefix = list(range(24))  # the rows of the instruction alone
    for max_rows, reads in ((24, True), (READ_ONCE_ROWS - 1, False)):
        e = extents_of(engine, True)
        assert streamed(e, [ids[i] for i in one_prefix], max_rows, 10**9) == [expected[i] for i in one_prefix]
        assert (e.shared_reads > 0) == reads, (max_rows, e.shared_reads, e.steps)
    monkeypatch.setattr(engine_module, "reads_once", lambda rows, shared, columns: True)
    counts = []  # (steps that read the prefix once, steps) of each stream
    for fixed, packed in [(False, True), (True, True), (True, False)]:
        for max_rows, budget, shuffle in [(8, 10**9, False), (5, 4 * (longest + MAX_NEW), True), (3, 3 * (longest + MAX_NEW), False)]:
            e = extents_of(engine, fixed, packed)
            e.prefixes = Prefixes(min_saved=0, saved_share=0)  # the document too: rows of two prefixes
            got = streamed(e, ids, max_rows, budget, shuffle)
            mismatches = [(i, x, y) for i, (x, y) in enumerate(zip(expected, got)) if x != y]
            assert not mismatches, (fixed, packed, max_rows, budget, mismatches[:3])
            counts.append((e.shared_reads, e.steps))
    assert all(reads > 0 for reads, _ in counts) and any(reads < steps for reads, steps in counts), counts


def test_a_step_that_reads_a_shared_prefix_once_replays_only_its_own_graph(monkeypatch):
    """On a GPU a step is captured once per shape and replayed: a step that reads a shared prefix
    once reads that computation's tensors, so it has graphs of its own, one per prefix (and columns
    shared), apart from the steps that read every row's copy; those of one prefix computation only
    are held. Replayed (StandInGraph: a replay recomputes what was captured, with the captured prefix), every
    row still answers as alone."""
    monkeypatch.setattr(engine_module, "reads_once", lambda rows, shared, columns: True)
    engine = load("float32")
    ids = engine.tokenize(shared_prompts())
    expected = [reference(engine, p) for p in ids]
    e = extents_of(engine, True)
    e.step.graphs = True  # (on a GPU: Engine(cuda_graphs=True))
    e.prefixes = Prefixes(min_saved=0, saved_share=0)
    replayed_by_stand_ins(monkeypatch)
    shapes = []  # the shape of every step captured
    step_capture = decode_step.DecodeStep._capture
    monkeypatch.setattr(decode_step.DecodeStep, "_capture", lambda self, inputs, batch, shape: (shapes.append(shape), step_capture(self, inputs, batch, shape))[1])
    StandInGraph.captures = 0
    assert streamed(e, ids, 6, 10**9, shuffle=True) == expected
    prefixes = {prefix for _, prefix in shapes}
    assert None in prefixes and len(prefixes - {None}) >= 2, shapes  # the copies' steps; the instruction's, the document's
    assert e.shared_reads > StandInGraph.captures == len(shapes)
    # when steps read another prefix computation once, the graphs of the one before go (they would pile up)
    e.step._graphs = {shape: "graph" for shape in [(4, None), (4, (0, 10)), (8, (0, 12)), (4, (1, 10))]}
    e.step._forget_other_prefixes(1)
    assert set(e.step._graphs) == {(4, None), (4, (1, 10))}


@pytest.mark.parametrize("options", [{}, OPTIONS], ids=["greedy", "options"])
@pytest.mark.parametrize("fixed", [False, True], ids=["eager", "fixed-shapes"])
def test_a_join_in_several_forwards_takes_a_decode_step_for_the_rows_in_the_batch_in_each(fixed, options, monkeypatch):
    """Chunked prefill: a join whose rows' tokens pass PREFILL_GROUP_TOKENS (12 here) takes several
    forwards, and in each every row already in the batch takes a decode step, one token each: the
    running rows and those that joined in the join's forwards before (their first token chosen), so
    that no row waits for the rest of the join. Every row still decodes as alone, rows that end
    inside a join included (computed past their end until the host reads their tokens)."""
    monkeypatch.setattr(engine_module, "PREFILL_GROUP_TOKENS", 12)
    engine = load("float32", **options)
    ids = engine.tokenize(prompts_40())
    expected = [reference(engine, p) for p in ids]
    e = extents_of(engine, fixed, True)
    joins = []  # of each join, (rows in the batch, rows decoding, rows prefilled) of each of its forwards
    reports = []  # of each join, the reports it returned
    join, forward = e._join, e._packed_forward

    def counted_join(*args):
        joins.append([])
        reports.append(join(*args))
        return reports[-1]

    def counted_forward(batch, prompts, shared, starts, decode=0):
        joins[-1].append((batch.n, decode, len(prompts)))
        return forward(batch, prompts, shared, starts, decode)

    past_end = []  # of each report the host reads, its rows that had ended at an earlier one
    settle = e._settle

    def counted_settle(report, *args):
        past_end.append(sum(row.done for row in report.rows))
        return settle(report, *args)

    e._join, e._packed_forward, e._settle = counted_join, counted_forward, counted_settle
    assert streamed(e, ids, 16, 10**9) == expected
    assert all(decode == n for forwards in joins for n, decode, _ in forwards), joins  # every row in the batch, in every forward
    for forwards in joins:  # the rows that joined in a forward decode in the next
        assert [n for n, _, _ in forwards[1:]] == [n + rows for n, _, rows in forwards[:-1]], forwards
    several = [forwards for forwards in joins if len(forwards) > 1]
    assert several and {bool(forwards[0][0]) for forwards in several} == {False, True}, joins  # with no row running and with rows running
    assert [len(r) for r in reports] == [len(forwards) for forwards in joins]  # a report each forward, read in order
    assert e.mixed_steps == sum(decode > 0 for forwards in joins for _, decode, _ in forwards)
    if not fixed:  # (no step launched ahead of the host: only rows that ended in a join's forward are computed past their end)
        assert any(past_end), past_end


def test_sampled_rows_draw_the_tokens_they_draw_alone():
    engine = load("float32+lora", do_sample=True, temperature=0.9, top_p=0.7, top_k=100)
    ids = engine.tokenize(prompts_40()[:16])
    seeds = [7 * i + 1 for i in range(len(ids))]
    alone = [result(engine.generate([p], [s])[0]) for p, s in zip(ids, seeds)]
    for packed in (True, False):
        e = extents_of(engine, True, packed)
        assert streamed(e, ids, 6, 700, shuffle=True, seeds=seeds) == alone
        assert (e.mixed_steps > 0) == packed


def test_a_token_budget_holds_the_rows_needs_not_rows_times_the_widest():
    """One wide row answers 24 tokens while 19 narrow ones come and go: within a budget of 4 rows of
    the widest, slots as wide as it hold 4 rows at a time; extents hold 8 (max_rows)."""
    tiny = load("float32")
    ids = sorted(tiny.tokenize(prompts_40()[:20]), key=len, reverse=True)
    budget = 4 * (len(ids[0]) + 24)
    figures = {}
    for extents in (False, True):
        engine = Engine(tiny.model, tiny.tokenizer, GenerationSettings(max_new_tokens=24, do_sample=False, stop=[]), fixed_shapes=True,
                        rows_kernel=reference_kernel, extents=extents)
        engine.step = EndsAt([24] + [4] * 19)  # (a stand-in step: row k ends after answers[k] tokens)
        done = list(engine.stream(Requests(Request(i, p, i) for i, p in enumerate(ids)), 8, budget))
        assert sorted(k for k, _ in done) == list(range(20))
        figures[extents] = (engine.row_steps / engine.steps, engine.steps)
    (slot_rows, slot_steps), (extent_rows, extent_steps) = figures[False], figures[True]
    assert slot_rows <= 4 < extent_rows and extent_steps < slot_steps, figures


def test_a_packed_prefill_is_checked_against_sdpa():
    """The kernel's contract gives sdpa's causal prefill (grouped query heads too: 4 over 2); a kernel
    that ignores the causal order, or that does not run here (PyTorch's on the CPU), is not used."""
    assert check_packed(torch.device("cpu"), torch.float32, kernel=reference_kernel) == (True, "its causal prefill is 0.00% from sdpa's")
    assert check_packed(torch.device("cpu"), torch.bfloat16, kernel=reference_kernel)[0]
    unordered = lambda *args, causal=False: reference_kernel(*args)  # noqa: E731
    ok, why = check_packed(torch.device("cpu"), torch.float32, kernel=unordered)
    assert not ok and why.startswith("its causal prefill is ") and why.endswith("from sdpa's (at most 2% allowed)"), why
    ok, why = check_packed(torch.device("cpu"), torch.float32)
    assert not ok and why.startswith("its kernel does not run a causal prefill here (NotImplementedError"), why


def test_reading_a_shared_prefix_once_is_checked_against_sdpa():
    """The kernel's contract, its log-sum-exps merging the two parts, gives sdpa's output over each
    row's prefix and own columns (grouped query heads too: 4 over 2); a kernel whose log-sum-exps
    come in another layout, or that does not run here (PyTorch's on the CPU), is not used: each row
    then reads its own copy of the prefix."""
    assert check_read_once(torch.device("cpu"), torch.float32, kernel=reference_kernel) == (True, "its steps that read a shared prefix once are 0.00% from sdpa's")
    assert check_read_once(torch.device("cpu"), torch.bfloat16, kernel=reference_kernel)[0]

    def other_layout(*args, lse=False, **kwargs):  # each query's log-sum-exp at another query's place
        out = reference_kernel(*args, lse=lse, **kwargs)
        return (out[0], out[1].flip(0)) if lse else out

    ok, why = check_read_once(torch.device("cpu"), torch.float32, kernel=other_layout)
    assert not ok and why.startswith("its steps that read a shared prefix once are ") and why.endswith("from sdpa's (at most 2% allowed)"), why
    ok, why = check_read_once(torch.device("cpu"), torch.float32)
    assert not ok and why.startswith("its kernel does not read a shared prefix once here (NotImplementedError"), why


def test_the_kernels_log_sum_exps_are_read_by_packed_query():
    """PyTorch's kernel gives its log-sum-exps per sequence ([sequences, heads, the most queries of
    one rounded up to 32], its attention.cu), or by packed query where there is one sequence: either
    way each packed query gets its own ([queries, heads])."""
    lse = torch.arange(10 * 3, dtype=torch.float32).view(10, 3)  # query q, head h: 3q + h
    starts = torch.tensor([0, 2, 3, 7, 10], dtype=torch.int32)
    by_sequence = torch.full((4, 3, 32), float("inf"))
    for b in range(4):
        by_sequence[b, :, : starts[b + 1] - starts[b]] = lse[starts[b] : starts[b + 1]].T
    assert torch.equal(packed_lse(by_sequence, starts, 10), lse)
    one = torch.full((1, 3, 32), float("inf"))
    one[0, :, :10] = lse.T
    assert torch.equal(packed_lse(one, torch.tensor([0, 10], dtype=torch.int32), 10), lse)


@pytest.mark.parametrize("counts, tokens, chunks", [
    ([3, 3, 3], 8, [(0, 2), (2, 3)]),
    ([9, 1, 1], 8, [(0, 1), (1, 3)]),  # a row longer than the chunk goes alone
    ([4, 4], 8, [(0, 2)]),  # exactly full
    ([5], 0, [(0, 1)]),
])
def test_packed_chunks_hold_at_most_their_tokens(counts, tokens, chunks):
    assert packed_chunks(counts, tokens) == chunks
    assert packed_chunks([PREFILL_GROUP_TOKENS // 2] * 3) == [(0, 2), (2, 3)]


def test_a_packed_join_dispatches_as_many_ops_whatever_its_rows():
    """The host's work for a packed prefill grows with the model's layers, not with the rows it packs:
    on a GPU one host thread launches each op (issue 24's H200 profile: prefill host-bound, one core
    at 100%). Counted with OpCounter (the kernel: the one launch it is on a GPU), with a repetition
    penalty (each row's prompt tokens marked seen): a stream's first join, of 12 rows or of 3, and
    every later join -- 1 to 8 rows joining 4 to 11 running, the running rows' decode step in its
    forward -- each dispatch one count of ops, and none reads a value on the host."""
    engine = load("float32", **OPTIONS)
    ids = sorted(engine.tokenize(prompts_40()), key=len, reverse=True)
    joins = []  # (rows joining, rows running, ops dispatched) of each join

    for max_rows in (12, 3):
        counter = OpCounter()
        e = Engine(engine.model, engine.tokenizer, engine.settings, fixed_shapes=True, rows_kernel=counter.one_kernel(reference_kernel),
                   extents=True, packed_prefill=True, share_prefix=False)
        join = e._join

        def counted(batch, joining, *args, join=join, counter=counter, e=e):
            running, before, prefills = batch.n, counter.total, e.prefills
            with counter:
                report = join(batch, joining, *args)
            assert e.prefills == prefills + 1  # (one forward each: PREFILL_GROUP_TOKENS not reached)
            assert counter.reads == 0  # no value read on the host: a GPU's join never waits for the device
            joins.append((len(joining), running, counter.total - before))
            return report

        e._join = counted
        assert len(list(e.stream(Requests(Request(i, p, i) for i, p in enumerate(ids)), max_rows, 10**9))) == len(ids)  # (a failed assert raises)
    first = {ops for _, running, ops in joins if not running}
    later = {ops for _, running, ops in joins if running}
    assert len(first) == 1 and len(later) == 1, joins
    assert {rows for rows, running, _ in joins if not running} == {12, 3}
    assert len({rows for rows, running, _ in joins if running}) > 2 and len({running for _, running, _ in joins if running}) > 2, joins
