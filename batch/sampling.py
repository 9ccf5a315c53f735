"""The next token of every running row at once, on the device (pure torch; safe to capture in a CUDA graph).

Greedy decoding takes the argmax. Sampling warps the logits as transformers' TemperatureLogitsWarper,
TopKLogitsWarper and TopPLogitsWarper do, in that order, then draws with the Gumbel-max trick:
argmax(warped + g), with g = -log(-log u) for uniform u, is a draw from softmax(warped).

The uniform numbers are not drawn from a random generator: they are a hash (splitmix64) of the row's
seed, the index of the token being chosen in the row's answer, and the vocabulary id. So a row's k-th
token depends only on its logits, its seed and k -- not on which rows share the step, in which slot,
after a resume or after an out-of-memory split -- and there is no per-row generator, no Python loop
over rows, and no host sync.
"""

from __future__ import annotations

import torch



def _int64(c: int) -> int:
    """A 64-bit constant as the signed value torch's int64 arithmetic (which wraps) works with."""
    return c - (1 << 64) if c >= 1 << 63 else c


GOLDEN = _int64(0x9E3779B97F4A7C15)  # splitmix64's increment
MIX1 = _int64(0xBF58476D1CE4E5B9)
MIX2 = _int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: a bijection of 64-bit values whose output bits all depend on all input bits."""
    x = (x ^ _shr(x, 30)) * MIX1
    x = (x ^ _shr(x, 27)) * MIX2
    return x ^ _shr(x, 31)


def uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] float64 numbers in (0, 1): splitmix64's output number (step * 2**32 + id) of the
    stream seeded by each row's (mixed) seed."""
    return uniforms_at(seeds, steps, torch.arange(vocab, dtype=torch.int64, device=seeds.device))


def uniforms_at(seeds: torch.Tensor, steps: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The numbers of `uniforms` at the vocabulary ids `ids` only ([vocab] or [rows, k])."""
    counter = (steps[:, None] << 32) + ids + 1
    bits = mix64(mix64(seeds)[:, None] + counter * GOLDEN)
    return (_shr(bits, 11).double() + 0.5) * 2.0**-53  # the top 53 bits, centred: never 0 or 1


def warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p, with transformers' semantics (ties at the k-th value are
    kept; top-p keeps the smallest set of most likely tokens whose probability exceeds top_p, and at
    least one). Filtered tokens get -inf."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        scores = _top_p(scores, top_p)
    return scores


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    # a stable sort, so that equal logits are ordered the same whatever rows share the step
    ordered, order = torch.sort(scores, descending=False, stable=True)
    drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
    drop[..., -1:].fill_(False)  # (fill_: an assignment would make a tensor of the scalar on the host)
    return scores.masked_fill(drop.scatter(-1, order, drop), -float("inf"))


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: the logits of tokens a row has seen (`seen`:
    [rows, vocab] bool, its prompt and answer so far) divided by `penalty` if positive, else multiplied."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def forbid_early(logits: torch.Tensor, steps: torch.Tensor, min_new_tokens: int, ids: torch.Tensor) -> torch.Tensor:
    """transformers' MinNewTokensLengthLogitsProcessor: tokens `ids` (EOS, the stop tokens) get -inf
    in the rows that have generated fewer than min_new_tokens tokens (`steps`)."""
    return torch.where((steps < min_new_tokens)[:, None], logits.index_fill(1, ids, -torch.inf), logits)


def choose(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, settings) -> torch.Tensor:
    """The next token of each row: logits [rows, vocab] (float32), seeds and steps [rows] (int64; a row's
    step is the number of tokens it has generated). `settings`: do_sample, temperature, top_k, top_p."""
    if not settings.do_sample:
        return logits.argmax(-1)
    if 0 < settings.top_k and settings.top_k + TIES < logits.shape[-1]:
        return _choose_among_top_k(logits, seeds, steps, settings)
    scores = warp(logits, settings.temperature, settings.top_k, settings.top_p)
    gumbel = -torch.log(-torch.log(uniforms(seeds, steps, logits.shape[-1])))
    return (scores.double() + gumbel).argmax(-1)


TIES = 8  # candidates kept beyond top_k, for tokens tied with the k-th (top-k keeps them all)


def _choose_among_top_k(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, settings) -> torch.Tensor:
    """`choose` with top-k on: the same draw, computed on the top_k + TIES best tokens instead of the
    whole vocabulary (every other token's warped score is -inf, so it can never be drawn): top-p sorts
    and the Gumbel noise is hashed for ~100 tokens a row instead of 32,000. The candidates are put in
    vocabulary order, so that ties go as in the whole vocabulary's stable sort and argmax. The same
    tokens as the whole-vocabulary path unless more than TIES tokens tie with the k-th logit (then
    the tied ones past them are not candidates) or the softmax's sum rounds differently by an ulp
    right at the top-p boundary."""
    scores = logits / settings.temperature if settings.temperature != 1.0 else logits
    values, ids = torch.topk(scores, settings.top_k + TIES)  # best first
    kth = values[..., settings.top_k - 1 : settings.top_k]
    ids, by_id = ids.sort(-1)
    values = values.gather(-1, by_id)
    values = values.masked_fill(values < kth, -float("inf"))
    if settings.top_p < 1.0:
        values = _top_p(values, settings.top_p)
    gumbel = -torch.log(-torch.log(uniforms_at(seeds, steps, ids)))
    return ids.gather(-1, (values.double() + gumbel).argmax(-1, keepdim=True)).squeeze(-1)
