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

In a SlotCache every slot is as wide as the widest running row, so the token budget holds
budget // widest rows: 183 of the 512 allowed while the bench's longest prompts run (1,145 columns
each). An ExtentCache (where decode attention reads each row's own keys: batch.decode_attention)
gives each row only its own need, a range of one buffer's columns (an extent), so the budget holds
rows up to the sum of their needs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_buffers = itertools.count(1)  # names every buffer made, so that graphs captured on one are not replayed on another
IDS, POS, SEED, COUNT = range(4)  # the rows of SlotCache.state: next input id, position, seed, tokens generated
START, LIMIT = 4, 5  # ExtentCache.state's too: the row's first column in the buffer, its last position (need - 1)


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

    state: torch.Tensor  # [4, rows] int64: next input id, position, seed, tokens generated (an ExtentCache's: [6, rows], + START, LIMIT)
    at: torch.Tensor  # [rows] int64: the column each row writes (the step sets it from the positions)
    columns: int  # the columns read: [0, columns)
    seen: torch.Tensor | None = None  # [rows, vocab] bool: the tokens of each row's prompt and answer (SlotCache.seen)
    shared: object = None  # the first columns every row has, read once (SlotCache.shared)
    extents: bool = False  # rows are in extents of one buffer (ExtentCache): state[START] and state[LIMIT] place them


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
    def tokens(self) -> int:
        """The cache tokens the buffers hold for rows (against the token budget)."""
        return self.slots * self.columns

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
            self._move_keys(src, dst, max(self.pos[s] for s, _ in moves))
            self.state[:, dst] = self.state[:, src]
            if self.seen is not None:
                self.seen[dst] = self.seen[src]
        self.pos = [self.pos[s] for s in order]
        self.need = [self.need[s] for s in order]
        self.prefix = [self.prefix[s] for s in order]
        self.n = len(order)

    def _move_keys(self, src: torch.Tensor, dst: torch.Tensor, columns: int) -> None:
        for layer in self.cache.layers:
            layer.move(src, dst, columns)

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
        if self.seen is None or not prompts:
            return
        self.seen[a : a + len(prompts)] = False
        rows = torch.repeat_interleave(torch.arange(a, a + len(prompts)), torch.tensor([len(ids) for ids in prompts]))
        tokens = torch.tensor([t for ids in prompts for t in ids], dtype=torch.long)
        self.seen[tuple(to_device(torch.stack([rows, tokens]), self.device))] = True  # (one copy to the device, one write)

    def advance(self) -> None:
        """The step has been launched: every running row's next token goes one column further."""
        self.pos = [p + 1 for p in self.pos]


class Extents:
    """The free column ranges of a buffer of `capacity` columns, for rows that each take one range
    (an extent) of their own need: first fit, and ranges given back merge with their neighbours."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.holes: list[list[int]] = [[0, capacity]]  # [start, end), in order, none empty or touching

    @property
    def free(self) -> int:
        return sum(end - start for start, end in self.holes)

    def take(self, need: int) -> int | None:
        """The first column of a free range of `need` columns, now taken; None if no hole is as wide."""
        for i, (start, end) in enumerate(self.holes):
            if end - start >= need:
                if end - start == need:
                    del self.holes[i]
                else:
                    self.holes[i][0] += need
                return start
        return None

    def give(self, start: int, need: int) -> None:
        """Free columns [start, start + need)."""
        end = start + need
        i = next((i for i, (s, _) in enumerate(self.holes) if s > start), len(self.holes))
        if i and self.holes[i - 1][1] == start:  # joins the hole before
            i -= 1
            self.holes[i][1] = end
        else:
            self.holes.insert(i, [start, end])
        if i + 1 < len(self.holes) and self.holes[i + 1][0] == end:  # ... and the one after
            self.holes[i][1] = self.holes.pop(i + 1)[1]


class ExtentLayer(DynamicLayer):
    """One layer's KV cache with each row in its own columns of one buffer [1, heads, columns,
    head_dim]. A decode step writes row i's key and value at column at[i] (its first column + its
    position) and hands attention the whole buffer: each row's keys are read from its own extent
    (batch.decode_attention.RowKeys.starts)."""

    def __init__(self, like: torch.Tensor, columns: int):
        super().__init__()
        shape = (1, like.shape[1], columns, like.shape[3])
        self.buf_k, self.buf_v = like.new_zeros(shape), like.new_zeros(shape)
        self.keys, self.values = self.buf_k, self.buf_v
        self.device, self.is_initialized = like.device, True
        self.at = None

    def read(self, at: torch.Tensor) -> None:
        self.at = at

    def update(self, key_states, value_states, *args, **kwargs):
        # [rows, heads, positions, dim] (a decode step's: one position a row; a packed prefill's: one
        # row of every token) -> column at[i] of the buffer [1, heads, columns, dim], i in row-major order
        heads, dim = key_states.shape[1], key_states.shape[3]
        self.buf_k[0].index_copy_(1, self.at, key_states.transpose(0, 1).reshape(heads, -1, dim))
        self.buf_v[0].index_copy_(1, self.at, value_states.transpose(0, 1).reshape(heads, -1, dim))
        return self.keys, self.values

    def write(self, columns: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put keys and values [heads, k, dim] into `columns` [k] of the buffer."""
        self.buf_k[0].index_copy_(1, columns, keys)
        self.buf_v[0].index_copy_(1, columns, values)


class ExtentCache(SlotCache):
    """A SlotCache whose rows each hold only their own need: row i's column p is column start[i] + p
    of one buffer of `capacity` columns (the token budget), and a row joins wherever a free range
    of its need is (Extents). Rows leaving free their range: nothing is copied, only their state.
    Slots beyond the running rows (a fixed-shape step's padding) write in scratch columns past the
    capacity, one each. `columns` is the widest need placed (the most keys a row reads)."""

    def __init__(self, model_config, device, vocab: int = 0):
        super().__init__(model_config, device, vocab)
        self.longest = getattr(model_config, "max_position_embeddings", None) or 4096  # bounds the capacity of an unbounded budget
        heads = model_config.num_attention_heads
        dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        self.most = 2**31 // dim - 2**16  # ... and this: the kernel's strides are 32-bit (a kv head is capacity x dim elements)
        self.extents: Extents | None = None
        self.start: list[int] = []  # slot -> its row's first column
        self.waiting: dict[int, int] = {}  # rows placed, not joined yet (the engine's key) -> their first columns

    @property
    def tokens(self) -> int:
        return self.extents.capacity if self.extents else 0  # (and a scratch column per slot)

    def place(self, needs: list[int], budget: int, max_rows: int) -> list[int] | None:
        """Take an extent for each of rows of these needs, in order (all or none): their first
        columns. The capacity is the token budget (at most max_rows of the model's longest sequence),
        made anew for a row wider than it when no row is running or placed."""
        if self.extents is None or (not self.n and self.extents.free == self.extents.capacity < needs[0]):
            self.extents = Extents(max(min(budget, max_rows * self.longest, self.most), needs[0]))
        starts = []
        for need in needs:
            start = self.extents.take(need)
            if start is None:
                for s, n in zip(starts, needs):
                    self.extents.give(s, n)
                return None
            starts.append(start)
        return starts

    def give_back(self, starts: list[int], needs: list[int]) -> None:
        for start, need in zip(starts, needs):
            self.extents.give(start, need)

    def reserve(self, n: int, need: int, like: list[torch.Tensor], budget: int, max_rows: int) -> None:
        """Buffers of the extents' capacity (+ a scratch column per slot) and max_rows slots (at least
        n), made once: with rows running they are kept, and only the widest need is raised."""
        if self.slots >= n and self.cache.layers and self.cache.layers[0].buf_k.shape[2] == self.extents.capacity + self.slots:
            if need > self.columns:  # a wider row reads more keys: the decode step's graphs are captured again
                self.columns, self.buffer = need, next(_buffers)
            return
        assert not self.n, "an ExtentCache's buffers are remade only with no rows running"
        self.cache.layers = []
        slots = max(n, max_rows)
        self.cache.layers = [ExtentLayer(k, self.extents.capacity + slots) for k in like]
        self.state = torch.zeros((6, slots), dtype=torch.long, device=self.device)
        self.at = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.slots, self.columns = slots, need
        self._scratch(0)
        if self.vocab:
            self.seen = torch.zeros((slots, self.vocab), dtype=torch.bool, device=self.device)
        self.buffer = next(_buffers)

    def _scratch(self, a: int) -> None:
        """Slots [a, slots) are padding: each writes its own scratch column, at position 0."""
        self.state[START, a:] = torch.arange(self.extents.capacity + a, self.extents.capacity + self.slots, device=self.device)
        self.state[LIMIT, a:] = 0

    def add(self, a: int, lengths: list[int], needs: list[int], layer_keys: list[tuple[torch.Tensor, torch.Tensor]], seeds: list[int],
            source: torch.Tensor | None = None, fixed: int = 0, prefixes: list[tuple | None] | None = None,
            starts: list[int] | None = None) -> None:
        """SlotCache.add, each row into its extent (`starts`: their first columns, from place)."""
        rows, width = len(lengths), layer_keys[0][0].shape[-2]
        if source is None:
            source = front_first(lengths, width, self.device)
        # Row i's column j < lengths[i] goes to column starts[i] + j of the buffer, from column j of its
        # keys for j < fixed, else from column fixed + source[i, j - fixed]: indexes made on the host
        # (no device sync: the rows' lengths are known there), the source columns on the device.
        counts = torch.tensor(lengths)
        row = torch.repeat_interleave(torch.arange(rows), counts)
        column = torch.arange(len(row)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        into = to_device(torch.tensor(starts)[row] + column, self.device)
        row, column = to_device(row, self.device), to_device(column, self.device)
        whence = torch.cat([torch.arange(fixed, device=source.device).expand(rows, fixed), source + fixed], dim=1)[row, column]
        for layer, (k, v) in zip(self.cache.layers, layer_keys):
            layer.write(into, k[row, :, whence].transpose(0, 1), v[row, :, whence].transpose(0, 1))  # [heads, columns, dim]
        self.join(a, lengths, needs, seeds, starts, prefixes)

    def write_prefixes(self, starts: list[int], uses: list, nodes: dict) -> None:
        """Copy into each row's extent the first u.k columns of its shared prefix (u: a batch.prefix.Use
        or None; nodes: Prefixes.nodes, per layer (keys, values) [1, heads, length, dim]) -- before a
        packed prefill of the rows' suffixes attends to them. One copy per prefix and layer."""
        rows: dict = {}
        for start, u in zip(starts, uses):
            if u:
                rows.setdefault(u, []).append(start)
        for u, firsts in rows.items():
            into = to_device((torch.tensor(firsts)[:, None] + torch.arange(u.k)).reshape(-1), self.device)
            for layer, node in zip(self.cache.layers, nodes[u.key]):
                k, v = (t[0, :, None, : u.k].expand(-1, len(firsts), -1, -1).reshape(t.shape[1], -1, t.shape[3]) for t in node)
                layer.write(into, k, v)

    def prefill(self, at: torch.Tensor) -> None:
        """The next forward is a packed prefill: token i's key and value go to column at[i]."""
        for layer in self.cache.layers:
            layer.read(at)

    def join(self, a: int, lengths: list[int], needs: list[int], seeds: list[int], starts: list[int], prefixes: list | None = None) -> None:
        """Rows whose keys and values are in their extents (from `starts`) join in slots [a, a + len(lengths))."""
        rows, b = len(lengths), a + len(lengths)
        self.state[[POS, SEED, START, LIMIT], a:b] = to_device(
            torch.tensor([lengths, seeds, starts, [need - 1 for need in needs]], dtype=torch.long), self.device)
        self.state[COUNT, a:b] = 0
        self.pos = self.pos[:a] + list(lengths)
        self.need = self.need[:a] + list(needs)
        self.start = self.start[:a] + list(starts)
        self.prefix = self.prefix[:a] + (list(prefixes) if prefixes is not None else [None] * rows)
        self.n = b

    def select(self, order: list[int]) -> None:
        """Keep the rows now in slots `order`: the others' extents are freed; only state moves."""
        kept = set(order)
        for slot in range(self.n):
            if slot not in kept:
                self.extents.give(self.start[slot], self.need[slot])
        super().select(order)
        self.start = [self.start[s] for s in order]
        self._scratch(self.n)

    def _move_keys(self, src: torch.Tensor, dst: torch.Tensor, columns: int) -> None:
        pass  # (a row's keys stay in its extent: its state says where)

    def step(self, rows: int, whole: bool) -> StepInputs:
        """The next decode step over slots [0, rows): every layer hands attention its whole buffer;
        each row reads at most `columns` keys (the widest need or, not `whole`, the most filled + 1)."""
        columns = self.columns if whole else min(self.used + 1, self.columns)
        at = self.at[:rows]
        for layer in self.cache.layers:
            layer.read(at)
        return StepInputs(self.state[:, :rows], at, columns, None if self.seen is None else self.seen[:rows], self.shared, extents=True)
