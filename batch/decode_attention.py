"""A decode step's attention over each row's own keys only (on a GPU, where the kernel checks out), and
over a prefix that every row shares, read once (shared_attention: the CPU's eager steps).

A decode step's rows sit left-aligned in the slots of the KV-cache buffer (batch.kv_cache), and a row
attends to columns [0, position]. sdpa with that mask reads every column of every row it is given: a
step replayed as a CUDA graph reads the whole buffer. With rows of mixed lengths that is about 5x the
keys the rows attend to (tools/schedule_sim.py on the bench's stream, for the 7B model in bf16: 61.2
GiB a step against 11.8 GiB; its weights are 12.6 GiB), and on a GPU a decode step is bound by the
bytes it reads.

PyTorch's memory-efficient attention kernel (the one sdpa runs with a mask on a GPU) also takes
sequences of their own lengths: sequence b's queries start at seqstart_q[b], its keys at
seqstart_k[b], and it reads seqlen_k[b] of them, in every head. In the cache's buffer [slots, kv
heads, columns, head_dim] a row's columns are contiguous in each kv head, the heads a fixed stride
apart, the rows too: each row is such a sequence, with seqlen_k = its position + 1, and its queries
are its query heads grouped by the kv head they share (no mask among them: a decode step has one
position per row). So every row reads its own keys only, from device tensors: a step keeps its
shapes and addresses, and is still captured as a graph. (The grid is rows x kv heads, as sdpa's.)

The kernel is a private op of PyTorch (`aten::_efficient_attention_forward`), GPU only. It is used
where `check` finds it and its output matches sdpa's on random data in the model's dtype; else decode
steps keep sdpa with the mask (one line on stderr says which). The bookkeeping (the sequences'
starts and lengths, query heads grouped by kv head) is tested on the CPU against sdpa through
`reference_kernel`, the kernel's contract written in plain torch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "komt_rows"  # the attention implementation decode steps switch the model to (prefill keeps sdpa)
CHECK_TOLERANCE = 0.02  # the kernel's output may be this far from sdpa's (relative L2): rounding, not a bug


def planless_sdpa() -> str:
    """sdpa on a GPU without cuDNN's attention: cuDNN builds a plan on the host for every new shape,
    and every prefill group has its own (the H200 profile of 2026-12-04: `_cudnn_attention_forward`
    took 794 ms of CPU for 36 ms of GPU over 736 prefill calls). The memory-efficient kernel (flash
    where there is no mask) needs no plan. Process-wide, as sdpa's backend switches are. Returns the
    log line."""
    torch.backends.cuda.enable_cudnn_sdp(False)
    return "prefill attention: sdpa without cuDNN (no per-shape plan on the host)"


CAUSAL_FROM_BOTTOM_RIGHT = 2  # the kernel's custom_mask_type (torch.nn.attention.bias.CausalVariant.LOWER_RIGHT)


def efficient_attention_kernel(query, key, value, seqstart_q, seqstart_k, max_q: int, max_k: int, seqlen_k, scale: float,
                               causal: bool = False, lse: bool = False):
    """PyTorch's memory-efficient attention over variable-length sequences (CUDA): query [1, Q, H, D]
    packed, key and value [1, K, H, D]; sequence b is queries seqstart_q[b]:seqstart_q[b+1] over keys
    seqstart_k[b] : seqstart_k[b] + seqlen_k[b] (int32 device tensors), in each of the H heads.
    `causal`: a sequence's last query attends to all its keys, the one before to all but the last,
    and so on (causal from the bottom right: a prefill's queries after the keys of its past).
    Returns [1, Q, H, D]; with `lse`, also each query's log-sum-exp of its scores [Q, H] in float32
    (packed_lse; check_read_once holds the result against sdpa before it is used)."""
    mask_type = CAUSAL_FROM_BOTTOM_RIGHT if causal else 0
    out, logsumexp, *_ = torch.ops.aten._efficient_attention_forward(
        query, key, value, None, seqstart_q, seqstart_k, max_q, max_k, 0.0, mask_type, lse, scale=scale, seqlen_k=seqlen_k
    )
    return (out, packed_lse(logsumexp, seqstart_q, query.shape[1])) if lse else out


def packed_lse(logsumexp: torch.Tensor, seqstart_q: torch.Tensor, queries: int) -> torch.Tensor:
    """The kernel's log-sum-exps by packed query [Q, H], from its tensor: [sequences, H, the most
    queries of one, rounded up to 32] (query j of sequence b at [b, :, j]: PyTorch's attention.cu
    for sequences of their own lengths), or [1, H, Q rounded up] (by packed query). Device ops only,
    no wait for the device (a graph's capture takes them)."""
    if logsumexp.shape[0] == 1:
        return logsumexp[0, :, :queries].transpose(0, 1)
    starts, query = seqstart_q.long(), torch.arange(queries, device=seqstart_q.device)
    sequence = torch.searchsorted(starts[1:], query, right=True)  # (a shape known on the host: nothing to wait for)
    return logsumexp[sequence, :, query - starts[sequence]]


def reference_kernel(query, key, value, seqstart_q, seqstart_k, max_q: int, max_k: int, seqlen_k, scale: float,
                     causal: bool = False, lse: bool = False):
    """efficient_attention_kernel's contract in plain torch (any device; for the tests). It refuses
    what the kernel would read out of bounds: a sequence's keys past the tensor, or more than max_k."""
    starts_q, starts_k, lengths = seqstart_q.long(), seqstart_k.long(), seqlen_k.long()
    assert bool((starts_k[:-1] + lengths <= key.shape[1]).all() and (lengths <= max_k).all() and (lengths >= 0).all()), "keys out of bounds"
    assert bool((starts_q[1:] - starts_q[:-1] <= max_q).all() and starts_q[-1] <= query.shape[1]), "queries out of bounds"
    columns = torch.arange(max_k, device=query.device)
    at = (starts_k[:-1, None] + columns).clamp(max=key.shape[1] - 1)  # [seqs, max_k]
    keys, values = key[0, at].float(), value[0, at].float()  # [seqs, max_k, H, D]
    counts = starts_q[1:] - starts_q[:-1]
    rows = (starts_q[:-1, None] + torch.arange(max_q, device=query.device)).clamp(max=query.shape[1] - 1)
    queries = query[0, rows].float()  # [seqs, max_q, H, D]
    scores = torch.einsum("sqhd,skhd->shqk", queries, keys) * scale
    allowed = (columns < lengths[:, None])[:, None, :]  # [seqs, 1, max_k]
    if causal:  # query i of a sequence of n queries over L keys: keys up to L - n + i
        allowed = allowed & (columns[None, None, :] <= (lengths - counts)[:, None, None] + torch.arange(max_q, device=query.device)[None, :, None])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("shqk,skhd->sqhd", torch.softmax(scores, -1), values)
    packed = torch.zeros(query.shape[1:], dtype=torch.float32, device=query.device)
    valid = torch.arange(max_q, device=query.device) < counts[:, None]
    packed[rows[valid]] = out[valid]
    if not lse:
        return packed.to(query.dtype)[None]
    sums = torch.full(query.shape[1:3], float("-inf"), device=query.device)  # [Q, H]
    sums[rows[valid]] = torch.logsumexp(scores, -1).transpose(1, 2)[valid]
    return packed.to(query.dtype)[None], sums


@dataclass
class RowKeys:
    """What a decode step hands the attention of every layer: each row's keys to read (its position
    + 1, at most the columns read) and the kernel that reads them. `starts`: where each row's keys
    begin in a buffer of extents (batch.kv_cache.ExtentCache; int32 [rows + 1]), read over at most
    `columns` keys; None: the rows are the slots of a SlotCache buffer. `queries`: the rows are a
    prefill's, their tokens packed into one sequence (packed_attention)."""

    lengths: torch.Tensor  # [rows] int32, on the device
    kernel: Callable = efficient_attention_kernel
    starts: torch.Tensor | None = None
    columns: int = 0
    queries: torch.Tensor | None = None  # a packed prefill's: where each row's queries start (int32 [rows + 1]), causal
    max_q: int = 0  # ... and the most queries of a row
    shared: SharedColumns | None = None  # (with `starts`) the first columns every row shares, read once from here;
    # `starts` and `lengths` are then those of each row's own columns after them (rows_attention)
    _sequences: dict = field(default_factory=dict, repr=False)

    def sequences(self, group: int, row_stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """seqstart_q, seqstart_k and seqlen_k of the step's rows (`row_stride`: a row's keys are this
        many key positions after the previous row's; with `starts`, where they are): made by the
        first layer, the same for the others."""
        if (group, row_stride) not in self._sequences:
            rows, device = len(self.lengths), self.lengths.device
            self._sequences[group, row_stride] = (
                torch.arange(0, (rows + 1) * group, group, dtype=torch.int32, device=device),
                self.starts if self.starts is not None else torch.arange(0, (rows + 1) * row_stride, row_stride, dtype=torch.int32, device=device),
                self.lengths,
            )
        return self._sequences[group, row_stride]

    def one_sequence(self, queries: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """seqstart_q, seqstart_k and seqlen_k of one sequence: `queries` queries over the shared columns
        (made on the device: inside a graph's capture too)."""
        if "one" not in self._sequences:
            device = self.lengths.device
            self._sequences["one"] = (torch.arange(2, dtype=torch.int32, device=device) * queries, torch.zeros(2, dtype=torch.int32, device=device),
                                      torch.full((1,), self.shared.columns, dtype=torch.int32, device=device))
        return self._sequences["one"]


def fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """One query position per row, over views of one slot-cache buffer [slots, Hk, W, D]: D
    contiguous, columns D apart, heads W columns apart, rows Hk heads apart (keys and values alike)."""
    _, heads, columns, dim = key.shape
    evenly = key.stride(3) == 1 and key.stride(2) == dim and key.stride(1) % dim == 0 and key.stride(1) >= columns * dim and key.stride(0) == heads * key.stride(1)
    return query.shape[2] == 1 and query.shape[1] % heads == 0 and evenly and key.stride() == value.stride() and key.shape == value.shape


def fits_extents(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """One query position per row, over an extent buffer [1, Hk, C, D], contiguous (keys and values alike)."""
    return query.shape[2] == 1 and key.shape[0] == 1 and query.shape[1] % key.shape[1] == 0 and key.is_contiguous() and value.is_contiguous() \
        and key.shape == value.shape


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keys: RowKeys, scale: float) -> torch.Tensor:
    """A prefill of rows whose tokens are packed into one sequence, none padded: query [1, Hq, T, D]
    (row b's tokens are keys.queries[b] : keys.queries[b + 1]), key and value an extent buffer [1,
    Hk, C, D] into which the forward has written the rows' keys and values. Row b's queries attend
    causally to its keys.lengths[b] keys from keys.starts[b] (its past -- a shared prefix copied into
    its extent -- then its own tokens up to each query's). One kernel call per query head of a kv
    head (Hq / Hk: one for Llama-2-7B), the heads of each call those of the kv heads. Returns [1, T, Hq, D]."""
    if not fits_extents(query[:, :, :1], key, value) or query.shape[0] != 1:
        raise ValueError("packed_attention: one sequence of packed rows over an extent buffer")
    _, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    packed_k, packed_v = (t[0].transpose(0, 1)[None] for t in (key, value))  # [1, C, Hk, D]
    q = query[0].view(kv_heads, group, tokens, dim)
    out = [keys.kernel(q[:, g].transpose(0, 1).reshape(1, tokens, kv_heads, dim), packed_k, packed_v, keys.queries, keys.starts, keys.max_q,
                       keys.columns, keys.lengths, scale, causal=True) for g in range(group)]  # each [1, T, Hk, D]: query heads h * group + g
    return (out[0] if group == 1 else torch.stack(out, dim=3)).reshape(1, tokens, heads, dim)  # (Llama-2-7B: one, nothing to stack)


def rows_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keys: RowKeys, scale: float, layer: int = 0) -> torch.Tensor:
    """Attention of one position per row over its first keys.lengths[i] columns. query [B, Hq, 1, D];
    key and value [B, Hk, C, D]: views of the slot cache's buffer (`fits`). Returns [B, 1, Hq, D], as
    transformers' attention functions do.

    Row b is sequence b of the kernel, in each of the Hk heads: its keys start at b * Hk * W key
    positions of a view whose heads are W positions apart (W: the buffer's columns), its queries are
    the group = Hq / Hk query heads of each kv head (query head h * group + g uses kv head h, as
    transformers' repeat_kv has it). The grid is rows x heads, as sdpa's.

    With keys.starts, key and value are an extent buffer [1, Hk, C, D] (fits_extents): row b's keys
    start at starts[b] of the same view, whatever the other rows'. With keys.shared too, the columns
    every row shares are read once, from the shared prefix's own keys and values (`layer`'s), as one
    sequence of all the rows' queries; then each row's own columns after them (from starts[b], its
    lengths[b]); and the two parts make one softmax (one_softmax: the kernel's log-sum-exps)."""
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    if keys.starts is not None:
        if not fits_extents(query, key, value):
            raise ValueError("rows_attention: one query position per row over an extent buffer")
        columns = keys.columns
        seqstart_q, seqstart_k, seqlen_k = keys.sequences(group, 0)
        packed_k, packed_v = (t[0].transpose(0, 1)[None] for t in (key, value))  # [1, C, Hk, D]: heads C columns apart
    else:
        if not fits(query, key, value):
            raise ValueError("rows_attention: one query position per row over slot-cache views")
        columns, width = key.shape[2], key.stride(1) // dim
        seqstart_q, seqstart_k, seqlen_k = keys.sequences(group, kv_heads * width)
        size, strides = (1, (rows - 1) * kv_heads * width + width, kv_heads, dim), (rows * kv_heads * width * dim, dim, width * dim, 1)
        packed_k, packed_v = (torch.as_strided(t, size, strides) for t in (key, value))
    packed_q = query.reshape(rows, kv_heads, group, dim).transpose(1, 2).reshape(1, rows * group, kv_heads, dim)
    if keys.shared is None:
        out = keys.kernel(packed_q, packed_k, packed_v, seqstart_q, seqstart_k, group, columns, seqlen_k, scale)
    else:
        width = keys.shared.columns
        shared_k, shared_v = (t[0, :, :width].transpose(0, 1)[None] for t in keys.shared.layers[layer])  # [1, P, Hk, D]
        starts_q, starts_k, lengths = keys.one_sequence(rows * group)
        common = keys.kernel(packed_q, shared_k, shared_v, starts_q, starts_k, rows * group, width, lengths, scale, lse=True)
        out = one_softmax(*common, *keys.kernel(packed_q, packed_k, packed_v, seqstart_q, seqstart_k, group, columns, seqlen_k, scale, lse=True))
    return out.reshape(rows, group, kv_heads, dim).transpose(1, 2).reshape(rows, 1, heads, dim)


def one_softmax(first: torch.Tensor, first_lse: torch.Tensor, second: torch.Tensor, second_lse: torch.Tensor) -> torch.Tensor:
    """Attention over two parts of each query's keys, from each part's: output [1, Q, H, D] and
    log-sum-exp of its scores [Q, H]. The first part's share of the one softmax over both is
    sigmoid(lse1 - lse2); computed in float32."""
    share = torch.sigmoid(first_lse - second_lse)[None, :, :, None]
    return torch.lerp(second.float(), first.float(), share).to(first.dtype)


# Reading a shared prefix once pays where its copies are many and most of what a step reads: measured
# on the CPU bench model's shapes (8 kv heads of 64, float32, 2 threads; sdpa with the mask against
# shared_attention, per layer), 32 rows of 440 shared + 80 own columns 2.61 -> 0.79 ms, 16 rows 1.11
# -> 0.39, but 8 rows 0.28 -> 0.33, and 24 rows of 32 shared + 300 own 1.25 -> 1.42.
READ_ONCE_ROWS = 16  # at least this many rows ...
READ_ONCE_SHARE = 0.5  # ... whose shared columns are at least this share of the columns the step reads


def reads_once(rows: int, shared: int, columns: int) -> bool:
    """Does a decode step of `rows` rows read their `shared` first columns once (of `columns` read)?"""
    return rows >= READ_ONCE_ROWS and shared >= READ_ONCE_SHARE * columns


@dataclass
class SharedColumns:
    """What a decode step hands the attention of every layer when all its rows start with the same
    shared prefix (batch.prefix.Prefixes.read_once): the prefix's keys and values per layer [1, Hk,
    >= columns, D], and how many of its columns every row has."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    columns: int
    key: object = None  # which computation of the prefix (a CUDA graph's step reads its tensors: batch.prefix.Prefixes.tag)


def shared_attention(query, key, value, mask, shared_key, shared_value, scale: float) -> torch.Tensor:
    """Attention of one position per row over columns every row shares (shared_key / shared_value [1,
    Hk, P, D], read once for all rows) followed by its own (key / value [B, Hk, C, D], `mask` [B, 1, 1,
    C] boolean: the columns it attends to) -- one softmax over both, as sdpa's over the row's P + C
    columns. query [B, Hq, 1, D]; Returns [B, 1, Hq, D], as transformers' attention functions do.

    A decode step over rows that each hold a copy of the same prefix reads every copy; this reads it
    once, as one matrix product of all rows' queries (in each kv head: the group = Hq / Hk query heads
    of each row, as transformers' repeat_kv has it). Scores and weights in float32."""
    rows, heads, _, dim = query.shape
    kv_heads, columns = key.shape[1], shared_key.shape[2]
    group = heads // kv_heads
    q = query.reshape(rows, kv_heads, group, dim)
    own = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scale).masked_fill_(~mask, float("-inf"))  # [B, Hk, group, C]
    by_head = q.transpose(0, 1).reshape(kv_heads, rows * group, dim)
    common = torch.matmul(by_head, shared_key[0].transpose(-1, -2)).float().mul_(scale)  # [Hk, B * group, P]
    weights = torch.softmax(torch.cat([common.view(kv_heads, rows, group, columns).transpose(0, 1), own], dim=-1), dim=-1)
    first = weights[..., :columns].transpose(0, 1).reshape(kv_heads, rows * group, columns).to(value.dtype)
    out = torch.matmul(first, shared_value[0]).view(kv_heads, rows, group, dim).transpose(0, 1)
    out = out + torch.matmul(weights[..., columns:].to(value.dtype), value)  # [B, Hk, group, D]
    return out.reshape(rows, 1, heads, dim)


_warned = []


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, row_keys: RowKeys | None = None,
              shared_columns: SharedColumns | None = None, **kwargs):
    """The attention implementation NAME: rows_attention in a decode step (which passes row_keys), or
    shared_attention (a step that passes shared_columns: its rows' common prefix read once), sdpa
    with the mask otherwise -- also for a step whose tensors are not slot-cache views (said once)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if shared_columns is not None:
        k, v = shared_columns.layers[module.layer_idx]
        n = shared_columns.columns
        return shared_attention(query, key[:, :, n:], value[:, :, n:], attention_mask[..., n:], k[:, :, :n], v[:, :, :n], scale), None
    if row_keys is not None and row_keys.queries is not None:
        return packed_attention(query, key, value, row_keys, scale), None
    if row_keys is not None and (row_keys.starts is not None or fits(query, key, value)):
        return rows_attention(query, key, value, row_keys, scale, module.layer_idx), None
    if row_keys is not None and not _warned:
        _warned.append(1)
        print("komt-batch: decode attention: a step's keys are not slot-cache views; sdpa with the mask instead", file=sys.stderr, flush=True)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def reading_rows(config):
    """Within the block, the model's attention is NAME (config: the model's; restored after)."""
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


@torch.no_grad()
def check(device: torch.device, dtype: torch.dtype, heads: int = 4, kv_heads: int = 2, dim: int = 128,
          kernel: Callable = efficient_attention_kernel) -> tuple[bool, str]:
    """Does `kernel` run here and give sdpa's output (with the mask) on random rows of mixed lengths,
    read from slot-cache views and from an extent buffer, in `dtype`, with the model's heads, kv heads and head size? Returns (use it, why) -- the why for the log."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows, columns, width = 6, 40, 48

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    query, buffer_k, buffer_v = rand(rows, heads, 1, dim), rand(rows + 2, kv_heads, width, dim), rand(rows + 2, kv_heads, width, dim)
    key, value = buffer_k[:rows, :, :columns], buffer_v[:rows, :, :columns]
    lengths = torch.tensor([1, 7, 40, 13, 33, 2], dtype=torch.int32)
    mask = (torch.arange(columns) < lengths[:, None].long())[:, None, None, :].to(device)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(heads // kv_heads, 1), value.repeat_interleave(heads // kv_heads, 1), attn_mask=mask
    ).transpose(1, 2)
    # ... and the same rows each in its own range of one buffer (an ExtentCache's), in another order
    starts = torch.tensor([100, 0, 150, 50, 250, 200], dtype=torch.int32)
    flat_k, flat_v = rand(1, kv_heads, 300, dim), rand(1, kv_heads, 300, dim)
    for i, start in enumerate(starts.tolist()):
        flat_k[0, :, start : start + columns], flat_v[0, :, start : start + columns] = key[i], value[i]
    return _verdict(lambda: (rows_attention(query, key, value, RowKeys(lengths.to(device), kernel), dim**-0.5),
                             rows_attention(query, flat_k, flat_v, RowKeys(lengths.to(device), kernel, torch.cat([starts, starts[-1:]]).to(device), columns),
                                            dim**-0.5)),
                    expected, "run", "its kernel's output is")


def _verdict(outputs: Callable[[], tuple[torch.Tensor, ...]], expected: torch.Tensor, runs: str, result: str) -> tuple[bool, str]:
    """A check's (use it, why): `outputs()` (the kernel's, one or more) against sdpa's `expected`,
    each within CHECK_TOLERANCE (relative L2); `runs` and `result` word the why."""
    try:
        got = outputs()
    except Exception as e:  # noqa: BLE001 -- a private op: absent, or other arguments or outputs in this torch
        return False, f"its kernel does not {runs} here ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]})"
    distance = max(((g.float() - expected.float()).norm() / expected.float().norm()).item() for g in got)
    if not distance <= CHECK_TOLERANCE:
        return False, f"{result} {distance:.2%} from sdpa's (at most {CHECK_TOLERANCE:.0%} allowed)"
    return True, f"{result} {distance:.2%} from sdpa's"


@torch.no_grad()
def check_packed(device: torch.device, dtype: torch.dtype, heads: int = 4, kv_heads: int = 2, dim: int = 128,
                 kernel: Callable = efficient_attention_kernel) -> tuple[bool, str]:
    """Does `kernel` give sdpa's output for a packed prefill (packed_attention): rows of mixed pasts
    and lengths, their tokens in one sequence, causal over each row's own keys in an extent buffer?
    Returns (use it, why), as check."""
    gen = torch.Generator(device="cpu").manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    pasts, lengths, starts = [0, 5, 12], [7, 1, 9], [40, 0, 70]
    query, buffer_k, buffer_v = rand(1, heads, sum(lengths), dim), rand(1, kv_heads, 100, dim), rand(1, kv_heads, 100, dim)
    expected, first = [], 0
    for past, n, start in zip(pasts, lengths, starts):
        k, v = (t[:, :, start : start + past + n].repeat_interleave(heads // kv_heads, 1) for t in (buffer_k, buffer_v))
        mask = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)
        expected.append(torch.nn.functional.scaled_dot_product_attention(query[:, :, first : first + n], k, v, attn_mask=mask).transpose(1, 2))
        first += n
    expected = torch.cat(expected, dim=1)
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    keys = RowKeys(as_int([p + n for p, n in zip(pasts, lengths)]), kernel, as_int(starts + [100]), max(p + n for p, n in zip(pasts, lengths)),
                   as_int([0, 7, 8, 17]), max(lengths))
    return _verdict(lambda: (packed_attention(query, buffer_k, buffer_v, keys, dim**-0.5),), expected, "run a causal prefill", "its causal prefill is")


@torch.no_grad()
def check_read_once(device: torch.device, dtype: torch.dtype, heads: int = 4, kv_heads: int = 2, dim: int = 128,
                    kernel: Callable = efficient_attention_kernel) -> tuple[bool, str]:
    """Does `kernel` give a decode step over extents that reads the rows' shared prefix once
    (rows_attention with RowKeys.shared: two calls, their log-sum-exps merged) sdpa's output over each
    row's prefix and own columns together? Rows of mixed own lengths, the prefix's node longer than
    the columns shared. Returns (use it, why), as check."""
    gen = torch.Generator(device="cpu").manual_seed(2)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    rows, width = 5, 24
    own, starts = [1, 9, 3, 17, 5], [60, 0, 40, 20, 80]
    query, node_k, node_v = rand(rows, heads, 1, dim), rand(1, kv_heads, width + 3, dim), rand(1, kv_heads, width + 3, dim)
    buffer_k, buffer_v = rand(1, kv_heads, 100, dim), rand(1, kv_heads, 100, dim)
    expected = []
    for i, (n, start) in enumerate(zip(own, starts)):
        k, v = (torch.cat([node[:, :, :width], buffer[:, :, start : start + n]], dim=2).repeat_interleave(heads // kv_heads, 1)
                for node, buffer in ((node_k, buffer_k), (node_v, buffer_v)))
        expected.append(torch.nn.functional.scaled_dot_product_attention(query[i : i + 1], k, v).transpose(1, 2))
    expected = torch.cat(expected)
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    keys = RowKeys(as_int(own), kernel, as_int(starts + [100]), max(own), shared=SharedColumns([(node_k, node_v)], width))
    return _verdict(lambda: (rows_attention(query, buffer_k, buffer_v, keys, dim**-0.5),), expected, "read a shared prefix once",
                    "its steps that read a shared prefix once are")
