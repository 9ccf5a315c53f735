"""The KV cache's bookkeeping under random streams, with a stand-in forward that makes any misplaced
key visible: a row's next token is a hash of every key it attends to, weighted by its column. Keys
are the tokens themselves, so a row sees exactly its own tokens at their positions (left-aligned:
column = position) or its answer changes. Every row of a random stream (unsorted prompt lengths,
small and large budgets, few and many places, both kinds of decode step) must answer as it does
alone, and the host's bookkeeping must match the device's at every step."""

import random

import pytest
import torch

from batch import kv_cache
from batch.config import GenerationSettings
from batch.engine import Engine, Request, Requests
from batch.prefix import Prefixes
from tests.test_exactness import load

VOCAB = 512


def stand_in(engine: Engine) -> None:
    """Replace the model's forward (prefill and decode step) by the key-hashing stand-in."""
    eos = int(engine.step.eos[0])
    layers = engine.model.config.num_hidden_layers

    def next_token(keys: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        total = (keys * weights * mask).sum(-1).round().long()
        token = (total * 7919 + mask.sum(-1)) % (VOCAB - 10) + 5
        token = torch.where(total % 11 == 0, torch.full_like(token, eos), token)  # rows end at different steps
        logits = torch.full((len(keys), VOCAB), -1.0)
        logits[torch.arange(len(keys)), token] = 1.0
        return logits

    def prefill(ids, mask, positions, cache):
        """A prefill group: left-padded ids after their past (a shared prefix's); the engine hands its 4D
        mask (batch.prefix.prefill_mask), whose last query row is the 2D mask of past and ids, or None
        where nothing is padded and there is no past."""
        keys = ids.to(torch.float64)[:, None, :, None]
        if mask is None:
            mask = torch.ones(ids.shape, dtype=torch.long)
        else:
            mask = mask[:, 0, -1, :]
            mask = (mask if mask.dtype == torch.bool else mask == 0).long()
        new = mask[:, -ids.shape[1] :]
        for i in range(layers):
            seen, _ = cache.update(keys * new[:, None, :, None], keys.clone(), i)
        return next_token(seen[:, 0, :, 0], mask.bool(), mask.cumsum(-1).double())  # a real column's weight: its position + 1

    def forward(ids, mask, positions, cache, row_keys=None, shared=None):
        keys = ids.to(torch.float64)[:, None, :, None]
        mask = mask[:, 0, 0, :]
        mask = mask if mask.dtype == torch.bool else mask == 0
        for i, layer in enumerate(cache.layers):
            k, _ = layer.update(keys.clone(), keys.clone())
            if i == 0:
                seen = k[:, 0, :, 0]
        return next_token(seen, mask, torch.arange(1, seen.shape[1] + 1, dtype=torch.float64))  # column c: position c

    engine._logits = prefill
    engine.step.forward = forward


def checked_steps(monkeypatch, budget: int) -> list[str]:
    """Check the bookkeeping at every decode step; returns what went wrong."""
    wrong = []
    step = kv_cache.SlotCache.step

    def check(self, rows, whole):
        inputs = step(self, rows, whole)
        device = self.state[kv_cache.POS, : self.n].tolist()
        if device != self.pos[: self.n]:
            wrong.append(f"host positions {self.pos[: self.n]} != device {device}")
        if any(p >= inputs.columns for p in device):
            wrong.append(f"a running row's position past the {inputs.columns} columns read")
        if max(self.need, default=0) > self.columns or (self.slots > 1 and self.slots * self.columns > budget):
            wrong.append(f"{self.slots} x {self.columns} buffer for needs {self.need} within {budget}")
        return inputs

    monkeypatch.setattr(kv_cache.SlotCache, "step", check)
    return wrong


@pytest.mark.parametrize("seed", range(6))
def test_random_streams_answer_as_each_row_alone(seed, monkeypatch):
    tiny = load("float32")
    rng = random.Random(seed)
    for _ in range(3):
        max_new = rng.choice([1, 2, 5, 16, 40])
        prompts = [[1] + [rng.randint(5, 300) for _ in range(rng.choice([rng.randint(1, 8), rng.randint(1, 60)]))]
                   for _ in range(rng.randint(1, 30))]
        longest = max(map(len, prompts)) + max_new
        budget = rng.choice([longest, 2 * longest, rng.randint(longest, 6 * longest), 10**9])
        max_rows = rng.randint(1, 12)
        for fixed in (False, True):
            engine = Engine(tiny.model, tiny.tokenizer, GenerationSettings(max_new_tokens=max_new, do_sample=False, stop=[]), fixed_shapes=fixed)
            stand_in(engine)
            alone = [engine.generate([p], [0])[0] for p in prompts]
            wrong = checked_steps(monkeypatch, budget)
            together = dict(engine.stream(Requests(Request(i, p, 0) for i, p in enumerate(prompts)), max_rows, budget))
            monkeypatch.undo()
            assert not wrong, wrong[:3]
            assert [together[i] for i in range(len(prompts))] == alone, (max_new, max_rows, budget, [len(p) for p in prompts])
            assert len({c.completion_tokens for c in alone}) > 1 or len(prompts) < 4 or max_new < 3  # rows end apart


@pytest.mark.parametrize("seed", range(4))
def test_random_streams_with_shared_prefixes_answer_as_each_row_alone(seed, monkeypatch):
    """Rows that share heads and documents (batch.prefix): a row must see the shared prefix's keys at
    their positions, then its own."""
    tiny = load("float32")
    rng = random.Random(100 + seed)
    heads = [[1] + [rng.randint(5, 300) for _ in range(rng.randint(16, 50))] for _ in range(2)]
    docs = [[rng.randint(5, 300) for _ in range(rng.randint(16, 40))] for _ in range(3)]
    for _ in range(3):
        max_new = rng.choice([1, 5, 16])
        prompts = [rng.choice(heads) + (rng.choice(docs) if rng.random() < 0.5 else []) + [rng.randint(5, 300) for _ in range(rng.randint(0, 20))]
                   for _ in range(rng.randint(2, 30))]
        longest = max(map(len, prompts)) + max_new
        budget = rng.choice([longest, 2 * longest, rng.randint(longest, 6 * longest), 10**9])
        max_rows = rng.randint(1, 12)
        for fixed in (False, True):
            engine = Engine(tiny.model, tiny.tokenizer, GenerationSettings(max_new_tokens=max_new, do_sample=False, stop=[]), fixed_shapes=fixed)
            engine.prefixes = Prefixes(min_saved=0, saved_share=0)  # every branch point shared, paying or not (the rule: test_prefix)
            stand_in(engine)
            alone = [engine.generate([p], [0])[0] for p in prompts]
            wrong = checked_steps(monkeypatch, budget)
            held, join = [], Engine._join
            monkeypatch.setattr(Engine, "_join", lambda self, batch, *a: (r := join(self, batch, *a), held.append((batch.slots * batch.columns, self.prefixes.tokens)))[0])
            order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
            together = dict(engine.stream(Requests(Request(i, prompts[i], 0) for i in order), max_rows, budget))
            monkeypatch.undo()
            assert not wrong, wrong[:3]
            assert [together[i] for i in range(len(prompts))] == alone, (max_new, max_rows, budget, [len(p) for p in prompts])
            assert engine.shared_prompt_tokens > 0 or len(prompts) < 2 or max_rows == 1
            assert all(cache + prefixes <= budget for cache, prefixes in held if prefixes), (budget, held)  # the prefixes kept count
            assert any(prefixes for _, prefixes in held) or len(prompts) < 3 or budget < 10**9, (budget, max_rows, held)  # kept where there is room


def test_a_new_buffer_leaves_room_for_the_shared_prefix(monkeypatch):
    """Where the budget binds, fewer rows join the first buffer so that the prefix they share is kept
    (within the budget) for the rows that follow: it is computed once, not once per join."""
    tiny = load("float32")
    rng = random.Random(7)
    head = [1] + [rng.randint(5, 300) for _ in range(40)]
    prompts = [head + [rng.randint(5, 300) for _ in range(rng.randint(5, 20))] for _ in range(12)]
    longest = max(map(len, prompts)) + 4
    budget = 4 * longest + 10  # four rows, or three and the head
    engine = Engine(tiny.model, tiny.tokenizer, GenerationSettings(max_new_tokens=4, do_sample=False, stop=[]), fixed_shapes=False)
    engine.prefixes = Prefixes(min_saved=0, saved_share=0)  # (a 41-token head: shared, paying or not)
    stand_in(engine)
    alone = [engine.generate([p], [0])[0] for p in prompts]
    engine.shared_prompt_tokens = engine.prefilled_prompt_tokens = 0
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    together = dict(engine.stream(Requests(Request(i, prompts[i], 0) for i in order), 8, budget))
    assert [together[i] for i in range(len(prompts))] == alone
    own = sum(map(len, prompts)) - engine.shared_prompt_tokens  # the rows' own suffixes
    assert engine.shared_prompt_tokens == len(prompts) * len(head) and engine.prefilled_prompt_tokens == own + len(head)
