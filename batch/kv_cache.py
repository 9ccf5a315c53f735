"""The running batch's KV cache: rows come and go, and every decode step writes in place.

Pure tensor bookkeeping (no model): `SlotCache` keeps the running rows' attention mask, position ids
and one `SlotLayer` per model layer; the engine hands its `cache` to the model's forward.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


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
    head_dim], of which the running rows' window is read. A decode step writes its column in place
    (transformers' DynamicLayer concatenates, copying the whole cache at every step)."""

    def __init__(self, like: torch.Tensor, slots: int, columns: int):
        super().__init__()
        shape = (slots, like.shape[1], columns, like.shape[3])
        self.buf_k, self.buf_v = like.new_zeros(shape), like.new_zeros(shape)  # zeros: padding stays finite
        self.device, self.is_initialized = like.device, True
        self.set_window(0, 0, 0)

    def set_window(self, n: int, lo: int, cur: int) -> None:
        self.n, self.lo, self.cur = n, lo, cur
        self.keys, self.values = self.buf_k[:n, :, lo:cur], self.buf_v[:n, :, lo:cur]

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.cur + key_states.shape[-2]
        self.buf_k[: self.n, :, self.cur : end] = key_states
        self.buf_v[: self.n, :, self.cur : end] = value_states
        self.set_window(self.n, self.lo, end)
        return self.keys, self.values

    def write(self, a: int, b: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put a prefilled group's keys and values into slots [a, b), from column `start` on."""
        self.buf_k[a:b, :, start : start + keys.shape[-2]] = keys
        self.buf_v[a:b, :, start : start + values.shape[-2]] = values

    def move(self, src: list[int], dst: list[int], lo: int, cur: int) -> None:
        """Copy slots src to slots dst, columns [lo, cur) only (the rest is masked out)."""
        for buf in (self.buf_k, self.buf_v):
            buf[dst, :, lo:cur] = buf[src, :, lo:cur]

    def copy_window(self, into: SlotLayer, n: int, lo: int, cur: int, to: int) -> None:
        """Copy slots [0, n), columns [lo, cur) to column `to` of `into` (this layer or a new one)."""
        for src, dst in ((self.buf_k, into.buf_k), (self.buf_v, into.buf_v)):
            dst[:n, :, to : to + cur - lo] = src[:n, :, lo:cur].clone()


class SlotCache:
    """The running batch's KV cache, attention mask and position ids, for rows that come and go.

    Running rows hold slots [0, n). Rows are right-aligned: every row's last token is in column
    cur - 1, so one decode step writes one column for all rows; a row's prompt is placed in the
    columns just before cur when it joins. Attention reads the window [lo, cur), lo being the first
    column of the row that has been in the batch longest; when cur reaches the end of the buffer the
    window moves back to column 0 (its width + max_new_tokens always fits: see `reserve`)."""

    def __init__(self, model_config, device):
        self.cache = DynamicCache(config=model_config)
        self.device = device
        self.slots = self.columns = self.n = self.cur = 0
        self.start: list[int] = []  # slot -> first column of its row
        self.mask = self.pos = None

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
            mask = torch.zeros((slots, columns), dtype=torch.long, device=self.device)
            pos = torch.zeros(slots, dtype=torch.long, device=self.device)
            self._move_window(width - self.width, layers, mask)
            if self.n:
                pos[: self.n] = self.pos[: self.n]
            self.cache.layers, self.mask, self.pos, self.slots, self.columns = layers, mask, pos, slots, columns
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
            mask[: self.n] = 0
        if window is not None:
            mask[: self.n, to : to + width] = window
        shift = to - self.lo
        self.start = [s + shift for s in self.start]
        self.cur = to + width

    def add(self, a: int, lengths: list[int], layer_keys: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Rows of a prefilled group (left-padded to lengths[0]) join in slots [a, a + len(lengths))."""
        b = a + len(lengths)
        start = self.cur - lengths[0]
        for layer, (k, v) in zip(self.cache.layers, layer_keys):
            layer.write(a, b, start, k, v)
        self.mask[a:b] = 0
        for slot, length in zip(range(a, b), lengths):
            self.mask[slot, self.cur - length : self.cur] = 1
        self.pos[a:b] = torch.tensor(lengths, device=self.device)
        self.start = self.start[:a] + [self.cur - length for length in lengths]
        self.n = b

    def select(self, order: list[int]) -> None:
        """Keep the rows now in slots `order` (compact_order's shape: only rows beyond the new size move)."""
        moves = [(src, dst) for dst, src in enumerate(order) if src != dst]
        if moves:
            src, dst = [s for s, _ in moves], [d for _, d in moves]
            for layer in self.cache.layers:
                layer.move(src, dst, self.lo, self.cur)
            self.mask[dst] = self.mask[src]
            self.pos[dst] = self.pos[src]
        self.start = [self.start[s] for s in order]
        self.n = len(order)
        if not self.n:
            self.cur = 0

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask and position ids for one decode step; the layers' windows set for it."""
        if self.cur == self.columns:
            self._move_window(0)
        lo = self.lo
        self.mask[: self.n, self.cur] = 1
        for layer in self.cache.layers:
            layer.set_window(self.n, lo, self.cur)
        return self.mask[: self.n, lo : self.cur + 1], self.pos[: self.n, None]

    def advance(self) -> None:
        self.cur += 1
        self.pos[: self.n] += 1
