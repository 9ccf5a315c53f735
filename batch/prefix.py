"""Shared prompt prefixes, computed once: which rows share which token prefix, and the prefixes' keys and values.

Rows that join the running batch together, and the prefixes still held from earlier joins, are laid
out as a radix tree of their token ids: in lexicographic order, the common prefix of two neighbours
is a branch point of the tree (the longest prefix a row shares with any other is the one it shares
with a neighbour). A branch point that adds at least MIN_SHARED tokens to the prefix it extends, and
saves at least MIN_SAVED tokens of prefill, becomes a node (and a join shares at all only if it saves
SAVED_SHARE of its prompt tokens: sharing costs forwards of its own, see below). A node's keys and
values are computed once, by a prefill of its own new tokens that attends to the prefix it extends,
and every row below it prefills only its own suffix, attending to the node's columns copied into its
past. Nodes of one depth are prefilled together, the rows after
them (batch.engine), all with the same function: `past_inputs` below.

Sharing is decided on the token ids the rows have (a prefix that tokenizes otherwise for a row is
not shared with it), and a row always prefills at least its last token (its logits choose its first
token). Keys depend only on the tokens before them, so a node's first k columns are the keys of its
first k tokens: a row may use part of a node. After a join, the engine keeps only the nodes that
join used (the template's head stays as long as rows keep coming with it); what it keeps counts in
the KV budget.

A row's slot holds copies of its prefix's columns, so that any decode step can read it as it reads
the others'. Where every running row starts from the same node, a decode step reads that node's
columns once for all of them instead (`Prefixes.read_once`; batch.decode_attention.shared_attention).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MIN_SHARED = 16  # a prefix is shared when it saves at least this many tokens of prefill per row
# Sharing has costs of its own: a level of new prefixes is a prefill forward of its own, and rows that
# start from a past are grouped apart (by their shorter suffixes; a group's rows all carry its widest
# past). On the CPU bench model (jobs/bench.yaml, one thread, per-call host time) a forward costs
# ~12 ms before its first token, as much as ~16 prompt tokens (0.75 ms each); in the bench's runs
# (all cores) prefill ran at 0.40 ms a token, so a forward weighs more. In jobs/bench.yaml one join shared
# anything: two rows starting with the same 315-token passage, 3.9% of its rows' tokens, for 3 more
# forwards (109 vs 106) -- a saving lost in the noise there (that join's prefills 6.02 s vs 6.20 s,
# one thread) while the job ran 4-10% slower with sharing; the annotation workload saves 85% of its
# joins' tokens. So sharing has to pay by a margin:
MIN_SAVED = 128  # a new prefix is made only if it saves this many tokens: its own tokens x (its rows - 1)
SAVED_SHARE = 0.1  # and a join shares at all only if it saves this share of its rows' prompt tokens


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


Key = tuple[int, ...]  # a node: its token ids
Tag = tuple[Key, int, int]  # what a row's slot copied: a node, which computation of it, how many of its columns


@dataclass(frozen=True)
class Use:
    """`k` columns of node `key` (k <= len(key)): the past a row or a node starts from."""

    key: Key
    k: int


@dataclass
class Sharing:
    """What a join computes: `levels` of new nodes (each node's Use: the prefix it extends, or None),
    a level only after the ones it extends; and each row's Use (None: prefilled whole)."""

    levels: list[list[tuple[Key, Use | None]]] = field(default_factory=list)
    rows: list[Use | None] = field(default_factory=list)

    def used(self) -> set[Key]:
        """Every node this join reads or makes."""
        keys = {key for level in self.levels for key, _ in level}
        keys |= {u.key for level in self.levels for _, u in level if u} | {u.key for u in self.rows if u}
        return keys


def plan_sharing(rows: Sequence[Sequence[int]], held: Sequence[Key], min_shared: int = MIN_SHARED, min_saved: int = MIN_SAVED,
                 saved_share: float = SAVED_SHARE) -> Sharing:
    """The nodes to compute for these rows, given the nodes `held` (pure: token ids only). Only where it
    pays: a new node must save `min_saved` tokens (its own tokens, once for each row below it but
    one), and the whole plan `saved_share` of the rows' tokens (the rows' shared columns less the
    nodes' computed ones); else nothing is shared."""
    seqs = [tuple(r) for r in rows]
    ordered = sorted(seqs)

    def below(node: Key) -> int:
        """The rows that start with node (in lexicographic order, those from node up to its successor)."""
        return bisect.bisect_left(ordered, node[:-1] + (node[-1] + 1,)) - bisect.bisect_left(ordered, node)

    held_sorted = sorted(set(held))
    everything = sorted(set(seqs) | set(held_sorted))
    branch = {a[:k] for a, b in zip(everything, everything[1:]) if (k := common_length(a, b)) >= min_shared}
    counts: dict[Key, int] = {}
    for s in seqs:
        counts[s] = counts.get(s, 0) + 1
    branch |= {s[:-1] for s, c in counts.items() if c > 1 and len(s) - 1 >= min_shared}  # identical rows share all but their last token

    def from_held(seq: Key, limit: int) -> Use | None:
        """The held node sharing the longest prefix with seq (its neighbours in lexicographic order)."""
        i = bisect.bisect_left(held_sorted, seq)
        best = None
        for node in held_sorted[max(0, i - 1) : i + 1]:
            k = min(common_length(seq, node), limit)
            if best is None or k > best.k:
                best = Use(node, k)
        return best

    nodes: dict[Key, Use | None] = {}  # new nodes -> the prefix each extends
    lengths: list[int] = []  # the new nodes' lengths, longest first

    def source(seq: Key, limit: int) -> Use | None:
        """The node sharing the longest prefix with seq, at most `limit` of its columns: a held node wins
        a tie (nothing to compute)."""
        best = from_held(seq, limit)
        for n in lengths:
            if n <= len(seq) and seq[:n] in nodes:
                if best is None or min(n, limit) > best.k:
                    best = Use(seq[:n], min(n, limit))
                break
        return best if best is not None and best.k >= min_shared else None

    for node in sorted(branch, key=len):
        use = source(node, len(node))
        if use is not None and use.k == len(node):  # held already: nothing to compute
            continue
        new = len(node) - (use.k if use else 0)
        if new < min_shared or new * (below(node) - 1) < min_saved:  # too little to share beyond what it extends
            continue
        nodes[node] = use
        lengths = sorted({*lengths, len(node)}, reverse=True)

    depth: dict[Key, int] = {}
    for node in sorted(nodes, key=len):  # (a node extends a shorter one)
        use = nodes[node]
        depth[node] = depth[use.key] + 1 if use is not None and use.key in nodes else 0
    levels = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for node in sorted(nodes, key=len):
        levels[depth[node]].append((node, nodes[node]))
    uses = [source(s, len(s) - 1) for s in seqs]
    saved = sum(u.k for u in uses if u) - sum(len(node) - (u.k if u else 0) for node, u in nodes.items())
    if saved < saved_share * sum(map(len, seqs)):
        return Sharing(rows=[None] * len(seqs))
    return Sharing(levels, uses)


class Prefixes:
    """The nodes' keys and values, per layer [1, kv_heads, len(key), head_dim], between joins; nodes
    planned where they pay (`min_saved`, `saved_share`: plan_sharing's; 0 and 0: every branch point)."""

    def __init__(self, min_saved: int = MIN_SAVED, saved_share: float = SAVED_SHARE):
        self.nodes: dict[Key, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.min_saved, self.saved_share = min_saved, saved_share
        # each computation of a node has a number of its own (a node dropped and made again may round
        # otherwise): a row's tag names the one its slot copied (tag), and a decode step reads a node
        # once only if it is still that computation (read_once)
        self._serials: dict[Key, int] = {}
        self._counter = itertools.count()

    @property
    def tokens(self) -> int:
        """The cache tokens held (a column of every layer's keys and values, as the KV budget counts)."""
        return sum(len(key) for key in self.nodes)

    def plan(self, rows: Sequence[Sequence[int]]) -> Sharing:
        return plan_sharing(rows, list(self.nodes), min_saved=self.min_saved, saved_share=self.saved_share)

    def add(self, key: Key, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.nodes[key] = layers
        self._serials[key] = next(self._counter)

    def keep(self, keys: set[Key]) -> None:
        self.nodes = {k: v for k, v in self.nodes.items() if k in keys}
        self._serials = {k: s for k, s in self._serials.items() if k in keys}

    def clear(self) -> None:
        self.nodes, self._serials = {}, {}

    def tag(self, use: Use | None) -> Tag | None:
        """What a row's slot holds of a held node: the node, its computation, the columns it copied."""
        return None if use is None else (use.key, self._serials[use.key], use.k)

    def read_once(self, tags: Sequence[Tag | None]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int] | None:
        """Where every row's slot starts with columns of the same computation of a node still held:
        that node's keys and values and the fewest columns a row copied (the columns all rows have);
        else None."""
        first = tags[0] if tags else None
        if first is None or self._serials.get(first[0]) != first[1] or any(t is None or t[1] != first[1] for t in tags):
            return None
        return self.nodes[first[0]], min(t[2] for t in tags)

    def past(self, uses: list[Use | None]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """A group's past: per layer, keys and values [rows, kv_heads, width, head_dim] with each row's
        prefix at the right (left-padded with zeros; on the nodes' device), and its mask [rows, width]
        (on the host); width 0 if none. Where every row starts from the same prefix (an annotation
        job's groups), the keys and values are views of the node's, expanded over the rows: no copy
        (the prefill forward's own concatenation is then the only one)."""
        width = max((u.k for u in uses if u), default=0)
        mask = torch.zeros((len(uses), width), dtype=torch.long)
        if not width:
            return [], mask
        for i, u in enumerate(uses):
            if u:
                mask[i, width - u.k :] = 1
        if all(u == uses[0] for u in uses):
            node = self.nodes[uses[0].key]
            return [tuple(t[:, :, :width].expand(len(uses), -1, -1, -1) for t in layer) for layer in node], mask
        same: dict[Use, list[int]] = {}  # rows of one prefix take it in one copy per layer
        for i, u in enumerate(uses):
            if u:
                same.setdefault(u, []).append(i)
        first = next(iter(self.nodes.values()))
        layers = []
        for layer in range(len(first)):
            out = []
            for part in (0, 1):
                like = first[layer][part]
                t = like.new_zeros((len(uses), like.shape[1], width, like.shape[3]))
                for u, rows in same.items():
                    node = self.nodes[u.key][layer][part][:, :, : u.k]
                    if len(rows) == rows[-1] - rows[0] + 1:  # (consecutive rows: a slice, no index)
                        t[rows[0] : rows[-1] + 1, :, width - u.k :] = node
                    else:
                        t[rows, :, width - u.k :] = node
                out.append(t)
            layers.append((out[0], out[1]))
        return layers, mask


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids left-padded to the longest: ids and mask [rows, width]."""
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def past_inputs(suffixes: list[list[int]], past_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prefill group of suffixes after their pasts: ids [rows, width] left-padded, the mask over
    past and suffix [rows, past + width], and each suffix token's position (its row's real tokens
    before it)."""
    ids, mask = left_pad(suffixes, pad_id)
    mask = torch.cat([past_mask, mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_mask.shape[1] :]
    return ids, mask, positions


def prefill_mask(mask: torch.Tensor, past: int, dtype: torch.dtype | None) -> torch.Tensor | None:
    """A prefill group's attention mask [rows, 1, width, past + width], made where `mask` [rows, past +
    width] is (on the device): query i attends to the real columns up to its own, past + i -- the mask
    transformers builds from `mask` (boolean for sdpa; additive in `dtype` for eager attention). The
    model gets it ready-made because transformers first asks the device whether any column is padding,
    which makes the host wait for the GPU at every prefill. None where nothing is padded and there is
    no past: sdpa's causal kernel then, as transformers chooses (check that on the host's mask)."""
    width = mask.shape[1] - past
    columns = torch.arange(past + width, device=mask.device)
    causal = columns[None, :] <= past + torch.arange(width, device=mask.device)[:, None]
    allowed = causal[None, None] & mask.bool()[:, None, None, :]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def aligned_columns(prefixes: list[int], suffixes: list[int], past: int, width: int) -> torch.Tensor:
    """For a group with pasts of `past` columns and suffixes left-padded to `width`: the column each
    output column of a row takes its key from, so that the row's prefix, then its suffix, come first
    (left-aligned, column = position) -- [rows, past + width]. Columns after them repeat real or
    padding columns (finite; never read: a row attends to columns up to its position)."""
    c = torch.arange(past + width)[None, :]
    p = torch.tensor(prefixes, dtype=torch.long)[:, None]
    s = torch.tensor(suffixes, dtype=torch.long)[:, None]
    in_prefix = past - p + c
    in_suffix = past + width - s - p + c
    rest = (c + past + width - s - p) % (past + width)
    return torch.where(c < p, in_prefix, torch.where(c < p + s, in_suffix, rest))
