"""Token lengths + limits -> batches, chunks and shards (pure, deterministic).

- Batches: rows sorted by prompt length, longest first (the batches that could run out of memory
  come first, and the ETA errs high), packed greedily while both limits hold:
  rows <= max_batch_size and rows x (longest prompt + max_new_tokens) <= max_batch_tokens.
  Sorting keeps the rows of a batch close in length, so left padding wastes little.
- Chunks: consecutive batches grouped up to `every_rows` rows; the unit of progress and of sharding.
- Shards: chunks dealt to N shards so that each gets about the same number of tokens.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    index: int
    first_batch: int
    last_batch: int  # inclusive
    rows: int
    tokens: int  # sum over its batches of rows x (longest prompt + max_new_tokens)

    @property
    def batches(self) -> range:
        return range(self.first_batch, self.last_batch + 1)


def batch_cost(longest_prompt: int, rows: int, max_new_tokens: int) -> int:
    return rows * (longest_prompt + max_new_tokens)


def plan_batches(
    lengths: Sequence[int], max_new_tokens: int, max_batch_size: int, max_batch_tokens: int
) -> list[list[int]]:
    """Row indices per batch. Every row must fit alone (the caller turns those that don't into errors)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        if current and (
            len(current) >= max_batch_size
            or batch_cost(longest, len(current) + 1, max_new_tokens) > max_batch_tokens
        ):
            batches.append(current)
            current = []
        if not current:
            longest = lengths[i]  # the first row of a batch is its longest
        current.append(i)
    if current:
        batches.append(current)
    return batches


def plan_chunks(batches: Sequence[Sequence[int]], lengths: Sequence[int], max_new_tokens: int, every_rows: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    first, rows, tokens = 0, 0, 0
    for b, batch in enumerate(batches):
        if rows and rows + len(batch) > every_rows:
            chunks.append(Chunk(len(chunks), first, b - 1, rows, tokens))
            first, rows, tokens = b, 0, 0
        rows += len(batch)
        tokens += batch_cost(max(lengths[i] for i in batch), len(batch), max_new_tokens)
    if rows:
        chunks.append(Chunk(len(chunks), first, len(batches) - 1, rows, tokens))
    return chunks


def assign_shards(chunks: Sequence[Chunk], shards: int) -> list[int]:
    """The shard of each chunk: largest chunks first, each to the shard with the fewest tokens so far."""
    owner = [0] * len(chunks)
    load = [(0, s) for s in range(shards)]
    heapq.heapify(load)
    for c in sorted(chunks, key=lambda c: (-c.tokens, c.index)):
        tokens, s = heapq.heappop(load)
        owner[c.index] = s
        heapq.heappush(load, (tokens + c.tokens, s))
    return owner
