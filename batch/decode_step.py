"""The running batch's decode step at fixed shapes, captured and replayed as CUDA graphs on a GPU.

One step, all on the device: the model's forward for every row's last token (all layers, attention
over the KV cache through a 4D mask, LoRA), the logits of that position, the choice of the next token
(batch.sampling) and the EOS / length flags. It leaves each row's next input token, position and
token count in the cache's per-slot state, and returns the chosen tokens with their flags as one
[2, rows] tensor: one transfer to the host per step.

Reading the whole buffer (SlotCache.step with `whole`), everything the step touches lives at
addresses fixed for the life of the cache's buffers, and nothing in it looks at a tensor's values on
the host. On a GPU it is therefore captured once per (buffer, row bucket) as a torch.cuda.CUDAGraph
and replayed at every later step of that shape: one launch instead of the forward's thousands of
kernels and its Python. A capture that fails, or whose replay does not give the eager step's logits
(within the rounding of other kernels: replay_difference), leaves the step eager (one line on stderr). On the CPU the same function runs eagerly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from batch.decode_attention import RowKeys
from batch.errors import first_line
from batch.kv_cache import COUNT, IDS, LIMIT, POS, SEED, START, SlotCache, StepInputs
from batch.memory import is_out_of_memory
from batch.sampling import choose, forbid_early, penalize_repeats

CAPTURE_WARMUP = 2  # eager runs before a capture: lazy initialisation (cuBLAS workspaces, bitsandbytes' state)
REPLAY_TOLERANCE = 0.25  # a replayed row's logits may be this far from the eager step's (relative L2): see replay_difference


def row_bucket(n: int, slots: int) -> int:
    """The rows a fixed-shape step computes for n running rows: the next power of two, at most the
    buffer's slots -- a handful of shapes, so a handful of graphs per buffer."""
    return min(slots, 1 << (n - 1).bit_length())


class DecodeStep:
    """`forward(ids [rows, 1], mask [rows, 1, 1, columns], positions [rows, 1], cache, row_keys, shared)` gives
    the last position's logits [rows, vocab] in float32 (row_keys: None, or each row's keys to read
    with `rows_kernel`; shared: None, or the columns all rows share, read once: batch.decode_attention).
    `mask_dtype`: None for a boolean mask (sdpa
    attention), else the dtype of an additive one (eager attention). `graphs`: capture on CUDA."""

    def __init__(self, forward: Callable, settings, eos_ids: list[int], device, mask_dtype: torch.dtype | None, graphs: bool,
                 rows_kernel: Callable | None = None):
        self.forward = forward
        self.rows_kernel = rows_kernel  # attention reads each row's own keys with it (batch.decode_attention); None: the mask's columns
        self.settings = settings
        self.eos = torch.tensor(sorted(eos_ids) or [-1], dtype=torch.long, device=device)  # (EOS and stop_token_ids)
        self.ends = bool(eos_ids)
        self.mask_dtype = mask_dtype
        self.graphs = graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # rows -> (graph, its output)
        self._buffer = None  # the cache buffer the graphs were captured on
        self._pool = None  # their memory
        self.captures = 0  # steps that captured a graph (warm-ups, capture, replay): one-off time, not a step's
        self._stream = None  # the side stream of warm-ups and captures
        self._told = False  # the first capture's check is logged

    def pick(self, logits: torch.Tensor, state: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Choose each row's next token; make it the row's next input and count it; return [tokens;
        done], done = EOS (or a stop token) or max_new_tokens reached. `state`: SlotCache.state's
        columns of these rows; `seen`: SlotCache.seen's rows of them (with a repetition penalty)."""
        s = self.settings
        if seen is not None:
            logits = penalize_repeats(logits, seen, s.repetition_penalty)
        if s.min_new_tokens and self.ends:  # no EOS or stop token before min_new_tokens
            logits = forbid_early(logits, state[COUNT], s.min_new_tokens, self.eos)
        tokens = choose(logits, state[SEED], state[COUNT], s)
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        state[COUNT].add_(1)
        state[IDS].copy_(tokens)
        done = (tokens[:, None] == self.eos).any(-1) | (state[COUNT] >= self.settings.max_new_tokens)
        return torch.stack([tokens, done.long()])

    def __call__(self, batch: SlotCache, rows: int, whole: bool) -> torch.Tensor:
        """Run one decode step over slots [0, rows) of `batch`; return its [2, rows] tokens and flags
        (a replayed graph's output tensor: it changes at the next replay)."""
        inputs = batch.step(rows, whole)
        if not (self.graphs and whole):
            return self._run(inputs, batch)[0]
        if batch.buffer != self._buffer:  # new buffers: the old graphs point at freed memory
            self.release()
            self._buffer = batch.buffer
        shape = rows, inputs.shared and (inputs.shared.key, inputs.shared.columns)  # (a step that reads a shared prefix once: a graph of its own)
        if shape not in self._graphs:
            if shape[1]:
                self._forget_other_prefixes(shape[1][0])
            return self._capture(inputs, batch, shape)
        graph, out = self._graphs[shape]
        graph.replay()
        return out

    def release(self) -> None:
        """Drop the captured graphs and their memory (new buffers, a failed stream, the stream's end)."""
        if self._graphs and torch.cuda.is_available():
            torch.cuda.synchronize()  # none of them may still be running
        self._graphs.clear()
        self._buffer = self._pool = None

    def _forget_other_prefixes(self, key) -> None:
        """Drop the graphs of steps that read another shared prefix once: the steps now read this one
        (the others' rows are gone or read their copies), and a prefix dropped and made again is
        another computation -- kept, its graphs would pile up."""
        stale = [shape for shape in self._graphs if shape[1] and shape[1][0] != key]
        if stale and torch.cuda.is_available():
            torch.cuda.synchronize()  # none of them may still be running
        for shape in stale:
            del self._graphs[shape]

    def _run(self, inputs: StepInputs, batch: SlotCache) -> tuple[torch.Tensor, torch.Tensor]:
        state = inputs.state
        # Each row writes the column of its position and attends to columns [0, position]: a running
        # row's position is always inside the columns read. (Padding rows' positions grow unchecked:
        # clamped, they write in their own slots, and every row sees at least one finite key, so no
        # attention is empty: NaN would reach the cache.)
        if inputs.extents:  # each row in its own columns of one buffer (ExtentCache), read by the kernel only
            position = torch.minimum(state[POS], state[LIMIT])  # (a row computed a step ahead of its end, and padding, stay in their own columns)
            torch.add(state[START], position, out=inputs.at)
            if inputs.shared is None:  # each row's keys from the first column of its extent
                starts, lengths, columns = state[START], position + 1, inputs.columns
            else:  # a shared prefix read once: each row's own columns after it (a padding row's: its one scratch column)
                first = torch.clamp(position, max=inputs.shared.columns)
                starts, lengths, columns = state[START] + first, position + 1 - first, max(inputs.columns - inputs.shared.columns, 1)
            keys = RowKeys(lengths.int(), self.rows_kernel, torch.nn.functional.pad(starts.int(), (0, 1)), columns, shared=inputs.shared)
            logits = self.forward(state[IDS][:, None], torch.ones((len(position), 1, 1, 1), dtype=torch.bool, device=position.device),
                                  position[:, None], batch.cache, keys, None)
            return self._chosen(logits, inputs)
        torch.clamp(state[POS], max=inputs.columns - 1, out=inputs.at)
        mask = (torch.arange(inputs.columns, device=inputs.at.device) <= inputs.at[:, None])[:, None, None, :]
        if self.mask_dtype is not None:
            mask = torch.zeros(mask.shape, dtype=self.mask_dtype, device=mask.device).masked_fill_(~mask, torch.finfo(self.mask_dtype).min)
        keys = None if self.rows_kernel is None else RowKeys((inputs.at + 1).int(), self.rows_kernel)
        logits = self.forward(state[IDS][:, None], mask, inputs.at[:, None], batch.cache, keys, inputs.shared)
        return self._chosen(logits, inputs)

    def _chosen(self, logits: torch.Tensor, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pick_and_advance(logits, inputs.state, inputs.seen), logits

    def pick_and_advance(self, logits: torch.Tensor, state: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """A decode step's end: pick, and every row's next token goes one position further."""
        out = self.pick(logits, state, seen)
        state[POS].add_(1)
        return out

    def _capture(self, inputs: StepInputs, batch: SlotCache, shape: tuple) -> torch.Tensor:
        """Capture this shape's step and replay it once (that is the step). The warm-up runs are real
        steps: they write the keys and values the replay writes again, and the rows' state is put
        back after each, so that only the replay advances it."""
        saved = inputs.state.clone()
        saved_seen = None if inputs.seen is None else inputs.seen.clone()  # (a warm-up marks its tokens as seen)

        def restore():
            inputs.state.copy_(saved)
            if saved_seen is not None:
                inputs.seen.copy_(saved_seen)
        self.captures += 1
        self._stream = self._stream or _side_stream()  # warm-ups and captures on one stream: the same kernels

        def run():
            return self._run(inputs, batch)

        eager_logits = _warm_up(run, restore, self._stream)
        try:
            graph, (out, logits) = _capture_graph(run, self._pool, self._stream)
            graph.replay()
            distance, agree = replay_difference(logits[: batch.n], eager_logits[: batch.n])
            compared = (f"its logits differ from the eager step's by up to {distance:.2%} of a row's (L2; {REPLAY_TOLERANCE:.0%} "
                        f"allowed) and the greedy tokens of {agree:.0%} of its {batch.n} rows agree")
            if not distance <= REPLAY_TOLERANCE:
                raise RuntimeError(f"its replay does not give the eager step: {compared}")
            if not self._told:  # once: what the check saw, for the log
                print(f"komt-batch: CUDA graphs: the decode step of {shape[0]} rows captured; {compared}", file=sys.stderr)
                self._told = True
        except Exception as e:  # noqa: BLE001 -- any failure to capture: decode eagerly, as on the CPU
            self.release()
            restore()
            if is_out_of_memory(e):  # ... but out of memory is the stream's to handle (split, lower the budget)
                raise
            print(f"komt-batch: CUDA graph capture failed ({type(e).__name__}: {first_line(e)}); decoding eagerly", file=sys.stderr)
            self.graphs = False
            return run()[0]
        self._pool = graph.pool()  # the next captures share it: graphs of one stream never run at once
        self._graphs[shape] = (graph, out)
        return out


def replay_difference(replayed: torch.Tensor, eager: torch.Tensor) -> tuple[float, float]:
    """How far a replayed step's logits [rows, vocab] are from the eager step's: the largest relative
    L2 distance of a row (inf if any is not finite), and the share of rows whose greedy token agrees.
    Kernels that round otherwise move a row's logits by percents in bf16 (on the 7B-shaped random
    Llama, one bf16 unit on 10% of every attention and MLP output moves them by 5%); a broken capture
    gives other numbers altogether (zeros or another row's logits: 100% and more)."""
    if not len(eager):
        return 0.0, 1.0
    difference = torch.where(replayed == eager, 0.0, replayed - eager)  # (equal infinities are no difference)
    distance = difference.norm(dim=-1) / eager.norm(dim=-1).clamp(min=torch.finfo(eager.dtype).tiny)
    distance = torch.nan_to_num(distance, nan=torch.inf).max().item()
    return distance, (replayed.argmax(-1) == eager.argmax(-1)).float().mean().item()


def _side_stream():
    return torch.cuda.Stream()


def _warm_up(run: Callable, restore: Callable, stream) -> torch.Tensor:
    """Run the step CAPTURE_WARMUP times eagerly on `stream` (a side stream, as capturing wants),
    restoring the rows' state after each; return the last run's logits."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(CAPTURE_WARMUP):
            _, logits = run()
            restore()
    torch.cuda.current_stream().wait_stream(stream)
    return logits


def _capture_graph(run: Callable, pool, stream) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]:
    """Capture `run` into a new CUDA graph on `stream` (its memory from `pool`, a new one if None);
    capturing executes nothing: the rows' state is left as it was."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        outputs = run()
    return graph, outputs
