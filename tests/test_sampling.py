"""Choosing the next token (batch/sampling.py): transformers' warpers, reproducible per row, the right distribution."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from batch.sampling import choose, forbid_early, mix64, penalize_repeats, uniforms, warp


def splitmix64(x: int) -> int:
    """The reference finalizer, in Python's unbounded integers."""
    m = (1 << 64) - 1
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & m
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & m
    return x ^ (x >> 31)


def test_uniforms_are_splitmix64_of_seed_step_and_id():
    seeds = torch.tensor([5, 2**63 - 1, 123456789])
    steps = torch.tensor([0, 7, 2**20])
    got = uniforms(seeds, steps, 6).tolist()
    for row, (seed, step) in enumerate(zip(seeds.tolist(), steps.tolist())):
        for i in range(6):
            bits = splitmix64((splitmix64(seed) + ((step << 32) + i + 1) * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
            assert got[row][i] == ((bits >> 11) + 0.5) * 2.0**-53
    assert mix64(torch.tensor([-1])).item() == splitmix64((1 << 64) - 1) - (1 << 64)  # int64 wraps like uint64


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.9, 100, 0.7), (1.0, 5, 1.0), (0.5, 0, 0.9), (1.3, 1, 0.5), (1.0, 0, 1.0), (0.7, 3000, 0.95)])
def test_warp_equals_transformers_warpers(temperature, top_k, top_p):
    torch.manual_seed(0)
    scores = torch.randn(16, 2000) * 3
    expected = scores
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(None, expected)
    if top_k > 0:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(warp(scores, temperature, top_k, top_p), expected)


SAMPLE = SimpleNamespace(do_sample=True, temperature=0.9, top_k=50, top_p=0.9)


def test_a_row_samples_the_same_tokens_whatever_shares_its_step():
    torch.manual_seed(1)
    vocab, steps = 300, 40
    logits = torch.randn(steps, vocab) * 2  # one row's logits at each of its steps
    seed = 8_431_555_012_345

    def alone(k):
        return choose(logits[k : k + 1], torch.tensor([seed]), torch.tensor([k]), SAMPLE).item()

    expected = [alone(k) for k in range(steps)]
    assert len(set(expected)) > 5  # really sampling
    others = torch.randn(7, vocab)
    for k in range(steps):
        slot = k % 8  # a different slot, different neighbours, neighbours at other steps
        batch = torch.cat([others[:slot], logits[k : k + 1], others[slot:]])
        seeds = torch.tensor([11, 12, 13, 14, 15, 16, 17, 18])
        seeds[slot] = seed
        at = torch.arange(8) * 3
        at[slot] = k
        assert choose(batch, seeds, at, SAMPLE)[slot].item() == expected[k]
    other_seed = [choose(logits[k : k + 1], torch.tensor([seed + 1]), torch.tensor([k]), SAMPLE).item() for k in range(steps)]
    assert other_seed != expected


def test_greedy_is_the_argmax():
    logits = torch.randn(5, 50)
    greedy = SimpleNamespace(do_sample=False)
    assert torch.equal(choose(logits, torch.arange(5), torch.zeros(5, dtype=torch.long), greedy), logits.argmax(-1))


def frequencies(draws: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(draws, minlength=vocab).double() / len(draws)


def test_samples_follow_the_warped_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    settings = SimpleNamespace(do_sample=True, temperature=0.8, top_k=5, top_p=0.95)
    probs = torch.softmax(warp(logits, 0.8, 5, 0.95), -1)[0].double()
    n = 40_000
    assert probs[-1] == 0 and probs[-2] == 0  # cut by top-k, and by top-p
    # many rows (seeds) at one step ...
    across_rows = choose(logits.expand(n, -1), torch.arange(n) * 7919 + 3, torch.zeros(n, dtype=torch.long), settings)
    # ... and one row over many steps
    across_steps = choose(logits.expand(n, -1), torch.full((n,), 42), torch.arange(n), settings)
    for draws in (across_rows, across_steps):
        freq = frequencies(draws, 6)
        sigma = torch.sqrt(probs * (1 - probs) / n)
        assert torch.all((freq - probs).abs() <= 5 * sigma + 1e-12), (freq, probs)


def test_no_token_outside_top_k_or_top_p_is_ever_drawn():
    torch.manual_seed(3)
    logits = torch.randn(64, 1000) * 4
    settings = SimpleNamespace(do_sample=True, temperature=1.0, top_k=20, top_p=0.8)
    allowed = torch.isfinite(warp(logits, 1.0, 20, 0.8))
    for step in range(20):
        drawn = choose(logits, torch.arange(64), torch.full((64,), step), settings)
        assert allowed[torch.arange(64), drawn].all()


def test_uniforms_look_uniform():
    u = uniforms(torch.arange(64), torch.arange(64) * 5, 4096).flatten()
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.002 and abs(u.var().item() - 1 / 12) < 0.001
    deciles = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert torch.all((deciles - 0.1).abs() < 0.002)
    # neighbouring ids, steps and seeds are not correlated
    grid = uniforms(torch.tensor([1, 2]), torch.tensor([0, 0]), 100_000)
    for a, b in [(grid[0, :-1], grid[0, 1:]), (grid[0], grid[1])]:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.02
    assert not math.isclose(uniforms(torch.tensor([1]), torch.tensor([0]), 1).item(), uniforms(torch.tensor([1]), torch.tensor([1]), 1).item())


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.9, 100, 0.7), (1.0, 5, 1.0), (0.7, 40, 0.95), (1.3, 20, 0.3)])
def test_top_k_candidates_draw_what_the_whole_vocabulary_draws(temperature, top_k, top_p):
    """The top-k path (sort and hash ~100 tokens, not the vocabulary) against the whole-vocabulary
    draw it replaces: the same token on every row and step, logits with ties at the k-th included
    (rounded to 0.1: many equal values)."""
    from batch import sampling

    gen = torch.Generator().manual_seed(3)
    rows, vocab = 96, 700
    logits = torch.cat([torch.randn(rows // 2, vocab, generator=gen) * 3, (torch.randn(rows // 2, vocab, generator=gen) * 2).round(decimals=1)])
    settings = SimpleNamespace(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    seeds, kth = torch.arange(rows) * 7919 + 11, torch.topk(logits, top_k).values[:, -1:]
    tied_past_k = (logits == kth).sum(-1) - (torch.topk(logits, top_k).values == kth).sum(-1)
    assert tied_past_k.max() > 0  # the rounded rows have ties at the k-th value ...
    exact = tied_past_k <= sampling.TIES  # ... within the candidates' margin
    assert exact.sum() > rows * 0.9
    for step in range(6):
        steps = torch.full((rows,), step)
        fast = choose(logits, seeds, steps, settings)
        whole = (warp(logits, temperature, top_k, top_p).double() - torch.log(-torch.log(uniforms(seeds, steps, vocab)))).argmax(-1)
        assert torch.equal(fast[exact], whole[exact])
        assert torch.isfinite(warp(logits, temperature, top_k, top_p).gather(-1, fast[:, None])).all()  # never outside top-k/top-p


@pytest.mark.parametrize("penalty", [1.3, 0.7, 1.0])
def test_repetition_penalty_equals_transformers_processor(penalty):
    """Over each row's tokens so far (repeats included), kept as a table of the tokens seen."""
    torch.manual_seed(4)
    scores = torch.randn(6, 300) * 3
    history = torch.randint(0, 300, (6, 40))
    seen = torch.zeros(6, 300, dtype=torch.bool).scatter_(1, history, True)
    assert torch.equal(penalize_repeats(scores, seen, penalty), RepetitionPenaltyLogitsProcessor(penalty)(history, scores.clone()))


def test_min_new_tokens_forbids_eos_and_stop_tokens_as_transformers_does():
    """Rows with fewer than min_new_tokens tokens (transformers: the same prompt length, so one count)."""
    torch.manual_seed(5)
    scores = torch.randn(4, 50)
    ends = torch.tensor([2, 7])
    for generated in (0, 2, 3, 9):
        expected = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=5, min_new_tokens=3, eos_token_id=[2, 7])(torch.zeros(4, 5 + generated, dtype=torch.long), scores.clone())
        assert torch.equal(forbid_early(scores, torch.full((4,), generated), 3, ends), expected)
