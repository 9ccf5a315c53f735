from batch.plan import assign_shards, batch_cost, plan_batches, plan_chunks


def test_batches_sorted_longest_first_and_within_both_limits():
    lengths = [5, 50, 7, 48, 6, 49, 100, 1]
    batches = plan_batches(lengths, max_new_tokens=10, max_batch_size=3, max_batch_tokens=200)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every row exactly once
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for b in batches:
        assert len(b) <= 3
        assert batch_cost(max(lengths[i] for i in b), len(b), 10) <= 200
    assert batches == [[6], [1, 5, 3], [2, 4, 0], [7]]


def test_ties_keep_input_order_and_plan_is_deterministic():
    lengths = [3] * 7
    assert plan_batches(lengths, 1, 3, 1000) == [[0, 1, 2], [3, 4, 5], [6]]


def test_chunks_group_consecutive_batches_up_to_every_rows():
    lengths = [10] * 10
    batches = plan_batches(lengths, 5, 3, 10_000)  # 3,3,3,1
    chunks = plan_chunks(batches, lengths, 5, every_rows=6)
    assert [(c.first_batch, c.last_batch, c.rows) for c in chunks] == [(0, 1, 6), (2, 3, 4)]
    assert chunks[0].tokens == 2 * 3 * 15
    # a batch larger than every_rows still gets a chunk of its own
    assert [c.rows for c in plan_chunks(batches, lengths, 5, every_rows=1)] == [3, 3, 3, 1]


def test_shards_balance_tokens():
    lengths = [100, 90, 80, 10, 10, 10, 10, 10]
    batches = plan_batches(lengths, 0, 1, 10_000)
    chunks = plan_chunks(batches, lengths, 0, every_rows=1)
    owner = assign_shards(chunks, 2)
    loads = [sum(c.tokens for c in chunks if owner[c.index] == s) for s in range(2)]
    assert sorted(loads) == [150, 170]  # the best split: {100, 10 x 5} and {90, 80}
    assert assign_shards(chunks, 1) == [0] * len(chunks)
    # more shards than chunks: one chunk each, the rest none -- in time and memory of the chunks, not the shards
    assert assign_shards(chunks, 10**20) == assign_shards(chunks, len(chunks) + 3) == list(range(len(chunks)))


def greedy_reference(lengths, max_new_tokens, max_batch_size, max_batch_tokens):
    """Row by row: longest first, a row joins the batch while both limits hold."""
    batches, current, longest = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if current and (len(current) >= max_batch_size or batch_cost(longest, len(current) + 1, max_new_tokens) > max_batch_tokens):
            batches.append(current)
            current = []
        if not current:
            longest = lengths[i]
        current.append(i)
    return batches + ([current] if current else [])


def test_packing_by_batch_equals_packing_row_by_row():
    import random

    rng = random.Random(5)
    for _ in range(300):
        lengths = [rng.choice([rng.randint(1, 40), rng.randint(1, 400)]) for _ in range(rng.randint(0, 120))]
        args = (rng.randint(0, 64), rng.randint(1, 40), rng.randint(1, 5000))
        if lengths and max(lengths) + args[0] > args[2]:
            continue  # a row that does not fit alone is settled before packing
        assert plan_batches(lengths, *args) == greedy_reference(lengths, *args)


def test_prompt_lengths_count_as_the_tokenizer_does():
    from transformers import AutoTokenizer

    from batch.planning import prompt_lengths
    from tests.conftest import TINY, seed_rows

    tokenizer = AutoTokenizer.from_pretrained(TINY / "base")
    prompts = [r["instruction"] for r in seed_rows()] + ["", " ", "<s>", "a <|end|> ### b", "🙂" * 5, "é\u0301\n\r\n\t", "x" * 3000]
    assert prompt_lengths(tokenizer, prompts) == [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    assert prompt_lengths(tokenizer, []) == []
