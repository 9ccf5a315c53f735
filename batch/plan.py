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

import numpy as np


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


def pack_batches(lengths: Sequence[int] | np.ndarray, max_new_tokens: int, max_batch_size: int, max_batch_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): the row indices longest first (ties: input order), and where each batch
    begins in that order. A batch's first row is its longest, so its size follows from that row
    alone: as many rows as both limits allow (at least one). Arrays, not lists: 8 bytes a row."""
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    starts = []
    i, n = 0, len(order)
    while i < n:
        starts.append(i)
        i += max(1, min(max_batch_size, max_batch_tokens // (int(lengths[order[i]]) + max_new_tokens)))
    return order, np.array(starts, dtype=np.int64)


def plan_batches(
    lengths: Sequence[int], max_new_tokens: int, max_batch_size: int, max_batch_tokens: int
) -> list[list[int]]:
    """Row indices per batch. Every row must fit alone (the caller turns those that don't into errors)."""
    order, starts = pack_batches(lengths, max_new_tokens, max_batch_size, max_batch_tokens)
    return [part.tolist() for part in np.split(order, starts[1:])] if len(order) else []


def plan_chunks(batches: Sequence[Sequence[int]], lengths: Sequence[int], max_new_tokens: int, every_rows: int) -> list[Chunk]:
    sizes = [len(b) for b in batches]
    costs = [batch_cost(max(lengths[i] for i in b), len(b), max_new_tokens) for b in batches]
    return group_chunks(sizes, costs, every_rows)


def group_chunks(sizes: Sequence[int], costs: Sequence[int], every_rows: int) -> list[Chunk]:
    """Consecutive batches (their row counts and token costs) grouped into chunks of up to every_rows rows."""
    chunks: list[Chunk] = []
    first, rows, tokens = 0, 0, 0
    for b, (size, cost) in enumerate(zip(sizes, costs)):
        if rows and rows + size > every_rows:
            chunks.append(Chunk(len(chunks), first, b - 1, rows, tokens))
            first, rows, tokens = b, 0, 0
        rows += int(size)
        tokens += int(cost)
    if rows:
        chunks.append(Chunk(len(chunks), first, len(sizes) - 1, rows, tokens))
    return chunks


def assign_shards(chunks: Sequence[Chunk], shards: int) -> list[int]:
    """The shard of each chunk: largest chunks first, each to the shard with the fewest tokens so far."""
    owner = [0] * len(chunks)
    load = [(0, s) for s in range(min(shards, len(chunks)))]  # (shards past the chunk count get none: the same assignment)
    heapq.heapify(load)
    for c in sorted(chunks, key=lambda c: (-c.tokens, c.index)):
        tokens, s = heapq.heappop(load)
        owner[c.index] = s
        heapq.heappush(load, (tokens + c.tokens, s))
    return owner
