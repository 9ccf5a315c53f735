"""The running batch's KV cache and per-row state: rows come and go, and every decode step writes in place.

Pure tensor bookkeeping (no model): `SlotCache` keeps one `SlotLayer` per model layer and, for every
slot of its buffers, the row's attention mask and its state on the device (next input token,
position, sampling seed, tokens generated); the engine hands its `cache` to the model's forward. A
decode step writes one column for all rows, at a column index held in a device tensor; it reads
either the running window (the fewest columns) or the whole buffer (the same shapes and addresses at
every step, which a CUDA graph needs).
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


class SlotLayer(DynamicLayer):
    """One layer's KV cache for a batch whose rows come and go: buffers of [slots, heads, columns,
    head_dim]. A decode step reads the view set by `read` and writes its column into it in place
    (transformers' DynamicLayer concatenates, copying the whole cache at every step)."""

    def __init__(self, like: torch.Tensor, slots: int, columns: int):
        super().__init__()
        shape = (slots, like.shape[1], columns, like.shape[3])
        self.buf_k, self.buf_v = like.new_zeros(shape), like.new_zeros(shape)  # zeros: padding stays finite
        self.device, self.is_initialized = like.device, True
        self.read(0, 0, 0, None)

    def read(self, rows: int, lo: int, hi: int, column: torch.Tensor | None) -> None:
        """The next step reads slots [0, rows), columns [lo, hi), and writes at `column` of that view
        (a one-element device tensor: its value may change between steps, its address may not)."""
        self.keys, self.values = self.buf_k[:rows, :, lo:hi], self.buf_v[:rows, :, lo:hi]
        self.column = column

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values

    def write(self, a: int, b: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put a prefilled group's keys and values into slots [a, b), from column `start` on."""
        self.buf_k[a:b, :, start : start + keys.shape[-2]] = keys
        self.buf_v[a:b, :, start : start + values.shape[-2]] = values

    def move(self, src: torch.Tensor, dst: torch.Tensor, lo: int, cur: int) -> None:
        """Copy slots src to slots dst, columns [lo, cur) only (the rest is masked out)."""
        for buf in (self.buf_k, self.buf_v):
            buf[dst, :, lo:cur] = buf[src, :, lo:cur]

    def copy_window(self, into: SlotLayer, n: int, lo: int, cur: int, to: int) -> None:
        """Copy slots [0, n), columns [lo, cur) to column `to` of `into` (this layer or a new one)."""
        for src, dst in ((self.buf_k, into.buf_k), (self.buf_v, into.buf_v)):
            dst[:n, :, to : to + cur - lo] = src[:n, :, lo:cur].clone()


@dataclass
class StepInputs:
    """What a decode step over slots [0, rows) reads and advances, all views of the cache's buffers."""

    mask: torch.Tensor  # [rows, columns read] bool: what each row attends to
    state: torch.Tensor  # [4, rows] int64: next input id, position, seed, tokens generated
    column: torch.Tensor  # [1] int64: the step's column within the columns read


class SlotCache:
    """The running batch's KV cache, attention mask and per-row state, for rows that come and go.

    Running rows hold slots [0, n); a fixed-shape step also computes slots [n, rows) as padding (their
    outputs are ignored, their state and columns are never read by a running row). Rows are
    right-aligned: every row's last token is in column cur - 1, so one decode step writes column cur
    for all rows; a row's prompt is placed in the columns just before cur when it joins. A running
    row's mask is true exactly on its own columns [start, cur). The window [lo, cur) starts at the
    first column of the row in the batch longest; when cur reaches the end of the buffer the window
    moves back to column 0 (its width + max_new_tokens always fits: see `reserve`)."""

    def __init__(self, model_config, device):
        self.cache = DynamicCache(config=model_config)
        self.device = device
        self.slots = self.columns = self.n = self.cur = 0
        self.start: list[int] = []  # slot -> first column of its row
        self.mask = self.state = None
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.buffer = 0  # which buffers these are (a new number each time they are made)

    @property
    def lo(self) -> int:
        """The window's first column: that of the row in the batch longest (cur when none is)."""
        return min(self.start) if self.start else self.cur

    @property
    def width(self) -> int:
        return self.cur - self.lo

    def reserve(self, n: int, width: int, room: int, like: list[torch.Tensor], budget: int, max_rows: int) -> None:
        """Make the buffers hold n rows whose tokens span `width` columns, plus `room` columns to grow
        into, and end the window at a column >= width (so a prompt of that length fits before it).

        A new buffer has as many slots as the token budget allows at this width (at least n), and,
        where the budget leaves it, `room` more columns: the oldest running row starts the window,
        so the window is at most its prompt + room wide and later rows start inside it -- in a stream
        sorted longest first such a buffer is made once. Its tokens stay within the budget."""
        need = width + room
        if self.slots < n or self.columns < need:  # (re)allocate; the running window is copied over
            slots = max(n, min(max_rows, budget // need))
            columns = max(need, min(need + room, budget // slots))
            if not self.n:  # nothing to copy: let the old buffer go first
                self.cache.layers = []
            layers = [SlotLayer(k, slots, columns) for k in like]
            mask = torch.zeros((slots, columns), dtype=torch.bool, device=self.device)
            state = torch.zeros((4, slots), dtype=torch.long, device=self.device)
            self._move_window(width - self.width, layers, mask)
            if self.n:
                state[:, : self.n] = self.state[:, : self.n]
            self.cache.layers, self.mask, self.state, self.slots, self.columns = layers, mask, state, slots, columns
            self.buffer = next(_buffers)
        elif self.cur < width:
            self._move_window(width - self.width)

    def _move_window(self, to: int, layers=None, mask=None) -> None:
        """Move the running window to start at column `to`, in place or into new buffers."""
        width = self.width
        if self.n:  # (the cache's layers are plain DynamicLayers until the first allocation, with n = 0)
            for old, new in zip(self.cache.layers, layers or self.cache.layers):
                old.copy_window(new, self.n, self.lo, self.cur, to)
        window = self.mask[: self.n, self.lo : self.cur].clone() if self.n else None
        if mask is None:
            mask = self.mask
            mask[: self.n] = False
        if window is not None:
            mask[: self.n, to : to + width] = window
        shift = to - self.lo
        self.start = [s + shift for s in self.start]
        self.cur = to + width

    def add(self, a: int, lengths: list[int], layer_keys: list[tuple[torch.Tensor, torch.Tensor]], seeds: list[int]) -> None:
        """Rows of a prefilled group (left-padded to lengths[0]) join in slots [a, a + len(lengths)):
        their keys and values, mask, positions (the next token's: the prompt's length) and seeds; no
        token generated yet. (Their first token is chosen from the prefill's logits: `ids` is set then.)"""
        b = a + len(lengths)
        start = self.cur - lengths[0]
        for layer, (k, v) in zip(self.cache.layers, layer_keys):
            layer.write(a, b, start, k, v)
        self.mask[a:b] = False
        for slot, length in zip(range(a, b), lengths):
            self.mask[slot, self.cur - length : self.cur] = True
        self.state[[POS, SEED], a:b] = to_device(torch.tensor([lengths, seeds], dtype=torch.long), self.device)
        self.state[COUNT, a:b] = 0
        self.start = self.start[:a] + [self.cur - length for length in lengths]
        self.n = b

    def select(self, order: list[int]) -> None:
        """Keep the rows now in slots `order` (compact_order's shape: only rows beyond the new size move)."""
        moves = [(src, dst) for dst, src in enumerate(order) if src != dst]
        if moves:
            src, dst = to_device(torch.tensor([[s for s, _ in moves], [d for _, d in moves]], dtype=torch.long), self.device)
            for layer in self.cache.layers:
                layer.move(src, dst, self.lo, self.cur)
            self.mask[dst] = self.mask[src]
            self.state[:, dst] = self.state[:, src]
        self.start = [self.start[s] for s in order]
        self.n = len(order)
        if not self.n:
            self.cur = 0

    def step(self, rows: int, whole: bool) -> StepInputs:
        """Set up the next decode step over slots [0, rows) (rows >= n: those beyond n are padding).
        It writes column cur; it reads the window [lo, cur] or, `whole`, every column of the buffer."""
        if self.cur == self.columns:
            self._move_window(0)
        lo, hi = (0, self.columns) if whole else (self.lo, self.cur + 1)
        self.column.fill_(self.cur - lo)
        for layer in self.cache.layers:
            layer.read(rows, lo, hi, self.column)
        return StepInputs(self.mask[:rows, lo:hi], self.state[:, :rows], self.column)

    def advance(self) -> None:
        """The step has been launched: the next one writes the next column (the device state advanced itself)."""
        self.cur += 1
