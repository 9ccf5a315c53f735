"""The running batch's KV cache and per-row state: rows come and go, and every decode step writes in place.

Pure tensor bookkeeping (no model): `SlotCache` keeps one `SlotLayer` per model layer and, for every
slot of its buffers, the row's state on the device (next input token, position, sampling seed,
tokens generated); the engine hands its `cache` to the model's forward.

Rows are left-aligned: a row's token at position p is in column p of its slot, so a row's next key
and value go to the column of its own position (each row writes its own column, read from the
device state), and a row attends to columns [0, position]: the mask is computed from the positions,
on the device. A row can join whenever a slot is free and its prompt plus max_new_tokens fits the
buffer's columns, whatever the other rows' ages. A decode step reads either the running rows'
columns (the fewest) or the whole buffer (the same shapes and addresses at every step, which a CUDA
graph needs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_buffers = itertools.count(1)  # names every buffer made, so that graphs captured on one are not replayed on another
IDS, POS, SEED, COUNT = range(4)  # the rows of SlotCache.state: next input id, position, seed, tokens generated


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host data onto the device; onto a GPU through pinned memory, without waiting: a copy from pageable
    memory would wait for the decode step launched ahead of the host, and the GPU would idle meanwhile."""
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


def compact_order(keep: list[int]) -> list[int]:
    """The new slot of each row that stays when others leave: rows stay where they are, except those
    beyond the new batch size, which move into the holes -- so only they are copied in the cache."""
    size = len(keep)
    kept = set(keep)
    holes = [s for s in range(size) if s not in kept]
    movers = [s for s in keep if s >= size]
    order = list(range(size))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    return order


def front_first(lengths: list[int], width: int, device) -> torch.Tensor:
    """For a group left-padded to `width`: the column each output column of a row takes its value
    from, so that row i's last lengths[i] columns come first (then its padding) -- [rows, width]."""
    shift = torch.tensor([width - n for n in lengths], dtype=torch.long)[:, None]
    return to_device((torch.arange(width) + shift) % width, device)


def left_aligned(keys: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """A left-padded group's keys or values [rows, heads, width, dim], each row's real columns moved
    to the front (`source`: front_first's index)."""
    rows, heads, width, dim = keys.shape
    return keys.gather(2, source[:, None, :, None].expand(rows, heads, width, dim))


class SlotLayer(DynamicLayer):
    """One layer's KV cache for a batch whose rows come and go: buffers of [slots, heads, columns,
    head_dim]. A decode step reads the view set by `read` and writes each row's key and value in place,
    at the row's own column (transformers' DynamicLayer concatenates, copying the whole cache at every step)."""

    def __init__(self, like: torch.Tensor, slots: int, columns: int):
        super().__init__()
        shape = (slots, like.shape[1], columns, like.shape[3])
        self.buf_k, self.buf_v = like.new_zeros(shape), like.new_zeros(shape)  # zeros: padding stays finite
        self.device, self.is_initialized = like.device, True
        self.read(0, 0, None)

    def read(self, rows: int, columns: int, at: torch.Tensor | None) -> None:
        """The next step reads slots [0, rows), columns [0, columns), and writes row i's key and value
        at column at[i] (a device tensor: its values may change between steps, its address may not)."""
        self.keys, self.values = self.buf_k[:rows, :, :columns], self.buf_v[:rows, :, :columns]
        self.at = at

    def update(self, key_states, value_states, *args, **kwargs):
        where = self.at.view(-1, 1, 1, 1).expand(key_states.shape)
        self.keys.scatter_(2, where, key_states)
        self.values.scatter_(2, where, value_states)
        return self.keys, self.values

    def write(self, a: int, b: int, keys: torch.Tensor, values: torch.Tensor, at: int = 0) -> None:
        """Put a prefilled group's keys and values (left-aligned) into slots [a, b), from column `at`."""
        self.buf_k[a:b, :, at : at + keys.shape[-2]] = keys
        self.buf_v[a:b, :, at : at + values.shape[-2]] = values

    def move(self, src: torch.Tensor, dst: torch.Tensor, columns: int) -> None:
        """Copy slots src to slots dst, columns [0, columns) only (the rest is masked out)."""
        for buf in (self.buf_k, self.buf_v):
            buf[dst, :, :columns] = buf[src, :, :columns]

    def copy_into(self, into: SlotLayer, n: int, columns: int) -> None:
        """Copy slots [0, n), columns [0, columns) into a new layer."""
        into.buf_k[:n, :, :columns] = self.buf_k[:n, :, :columns]
        into.buf_v[:n, :, :columns] = self.buf_v[:n, :, :columns]


@dataclass
class StepInputs:
    """What a decode step over slots [0, rows) reads and advances, all views of the cache's buffers."""

    state: torch.Tensor  # [4, rows] int64: next input id, position, seed, tokens generated
    at: torch.Tensor  # [rows] int64: the column each row writes (the step sets it from the positions)
    columns: int  # the columns read: [0, columns)
    seen: torch.Tensor | None = None  # [rows, vocab] bool: the tokens of each row's prompt and answer (SlotCache.seen)
    shared: object = None  # the first columns every row has, read once (SlotCache.shared)


class SlotCache:
    """The running batch's KV cache and per-row state, for rows that come and go.

    Running rows hold slots [0, n); a fixed-shape step also computes slots [n, rows) as padding (their
    outputs are ignored, their columns are never read by a running row). A row takes `need` columns
    (its prompt + max_new_tokens), so a buffer of `columns` takes any row whose need fits, at any
    step. The host keeps each running row's next column (`pos`, as on the device) and its need."""

    def __init__(self, model_config, device, vocab: int = 0):
        self.cache = DynamicCache(config=model_config)
        self.vocab = vocab  # > 0: keep `seen`, each slot's tokens so far (for a repetition penalty)
        self.seen = None
        self.device = device
        self.slots = self.columns = self.n = 0
        self.pos: list[int] = []  # slot -> the column its next token is written to (= its position)
        self.need: list[int] = []  # slot -> the columns its row may take (prompt + max_new_tokens)
        self.prefix: list[tuple | None] = []  # slot -> the shared prefix its first columns copy (Prefixes.tag)
        self.shared = None  # for the next eager step: the first columns of every running row, to be read once
        # from a shared prefix instead of from each slot (batch.decode_attention.SharedColumns; set by the engine)
        self.state = self.at = None
        self.buffer = 0  # which buffers these are (a new number each time they are made)

    @property
    def used(self) -> int:
        """Columns the running rows have filled: every running row's tokens are in [0, used)."""
        return max(self.pos, default=0)

    def reserve(self, n: int, need: int, like: list[torch.Tensor], budget: int, max_rows: int) -> None:
        """Make the buffers hold n rows whose needs are at most `need` columns. A new buffer has `need`
        columns and as many slots as the token budget allows (slots x columns <= budget, at least n,
        at most max_rows); the running rows are copied over."""
        if self.slots >= n and self.columns >= need:
            return
        slots = max(n, min(max_rows, budget // need))
        if not self.n:  # nothing to copy: let the old buffers go first
            self.cache.layers = []
        state = torch.zeros((4, slots), dtype=torch.long, device=self.device)
        if self.n:
            state[:, : self.n] = self.state[:, : self.n]
        # Layer by layer, each old layer freed once copied: at most one layer is held twice.
        # (Running rows have filled at most their need; a row's host position reaches its need once it
        # has been computed a step ahead of finishing: that column is not copied.)
        columns = min(self.used, self.columns, need)
        layers = []
        for i, k in enumerate(like):
            layers.append(SlotLayer(k, slots, need))
            if self.n:
                self.cache.layers[i].copy_into(layers[i], self.n, columns)
                self.cache.layers[i] = layers[i]
        self.cache.layers, self.state, self.slots, self.columns = layers, state, slots, need
        self.at = torch.zeros(slots, dtype=torch.long, device=self.device)
        if self.vocab:
            seen = torch.zeros((slots, self.vocab), dtype=torch.bool, device=self.device)
            if self.n:
                seen[: self.n] = self.seen[: self.n]
            self.seen = seen
        self.buffer = next(_buffers)

    def add(self, a: int, lengths: list[int], needs: list[int], layer_keys: list[tuple[torch.Tensor, torch.Tensor]], seeds: list[int],
            source: torch.Tensor | None = None, fixed: int = 0, prefixes: list[tuple | None] | None = None) -> None:
        """Rows of a prefilled group (left-padded to lengths[0]) join in slots [a, a + len(lengths)):
        their keys and values (moved to the front), positions (the next token's: the prompt's length)
        and seeds; no token generated yet. (Their first token is chosen from the prefill's logits:
        `ids` is set then.) `source`: the column each row's key comes from, for a group laid out
        otherwise (a shared prefix's past before the suffixes: batch.prefix.aligned_columns). `fixed`:
        the first columns of every row are in place already (one shared prefix's, as wide as the past):
        they are copied as they are, and `source` moves the columns after them. `prefixes`: the shared
        prefix each row's first columns copy (batch.prefix.Prefixes.tag; None: none)."""
        b = a + len(lengths)
        if source is None:  # (once for all layers: one copy to the device, no wait)
            source = front_first(lengths, layer_keys[0][0].shape[-2], self.device)
        for layer, (k, v) in zip(self.cache.layers, layer_keys):
            if fixed:
                layer.write(a, b, k[:, :, :fixed], v[:, :, :fixed])
            layer.write(a, b, left_aligned(k[:, :, fixed:], source), left_aligned(v[:, :, fixed:], source), at=fixed)
        self.state[[POS, SEED], a:b] = to_device(torch.tensor([lengths, seeds], dtype=torch.long), self.device)
        self.state[COUNT, a:b] = 0
        self.pos = self.pos[:a] + list(lengths)
        self.need = self.need[:a] + list(needs)
        self.prefix = self.prefix[:a] + (list(prefixes) if prefixes is not None else [None] * len(lengths))
        self.n = b

    def select(self, order: list[int]) -> None:
        """Keep the rows now in slots `order` (compact_order's shape: only rows beyond the new size move)."""
        moves = [(src, dst) for dst, src in enumerate(order) if src != dst]
        if moves:
            src, dst = to_device(torch.tensor([[s for s, _ in moves], [d for _, d in moves]], dtype=torch.long), self.device)
            columns = max(self.pos[s] for s, _ in moves)
            for layer in self.cache.layers:
                layer.move(src, dst, columns)
            self.state[:, dst] = self.state[:, src]
            if self.seen is not None:
                self.seen[dst] = self.seen[src]
        self.pos = [self.pos[s] for s in order]
        self.need = [self.need[s] for s in order]
        self.prefix = [self.prefix[s] for s in order]
        self.n = len(order)

    def step(self, rows: int, whole: bool) -> StepInputs:
        """Set up the next decode step over slots [0, rows) (rows >= n: those beyond n are padding).
        It reads the running rows' columns [0, used] or, `whole`, every column of the buffer."""
        columns = self.columns if whole else min(self.used + 1, self.columns)
        at = self.at[:rows]
        for layer in self.cache.layers:
            layer.read(rows, columns, at)
        return StepInputs(self.state[:, :rows], at, columns, None if self.seen is None else self.seen[:rows], None if whole else self.shared)

    def see(self, a: int, prompts: list[list[int]]) -> None:
        """Rows joining in slots [a, a + len(prompts)) have seen their prompts' tokens (with `seen` kept)."""
        if self.seen is None:
            return
        self.seen[a : a + len(prompts)] = False
        for i, ids in enumerate(prompts):
            self.seen[a + i, to_device(torch.tensor(ids, dtype=torch.long), self.device)] = True

    def advance(self) -> None:
        """The step has been launched: every running row's next token goes one column further."""
        self.pos = [p + 1 for p in self.pos]
