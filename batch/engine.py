"""Generating: a stream of tokenized prompts in, one Completion per row out (loading: batch.loading).

`Engine.stream` is a small decode loop over transformers' model forward and a KV cache of its own:

- prompts are left-padded with a pad id that is masked out everywhere (Llama-2 has no pad token;
  we use <unk>, never eos: pad = eos is what breaks batched Llama output, transformers #25790), and
  position ids count only real tokens, so a padded row computes what it would compute alone;
- every row stops on its own: on EOS or at max_new_tokens (flags computed on the device), or on a
  stop word (checked on the host, only after a token that can complete one: stops.StopRule) --
  and a finished row leaves the batch at once (its rows of the KV cache are dropped), so one long
  answer does not keep the others computing;
- the places of finished rows are refilled from the stream (continuous batching): new rows are
  prefilled and join the running batch, each in a free slot of the KV cache, left-aligned (SlotCache:
  a row writes the column of its own position), so the batch stays full until the stream runs dry;
  where decode attention reads each row's own keys (a GPU's kernel), each row holds only its own
  need, a free range of one buffer (ExtentCache), so the token budget holds the rows' needs rather
  than rows x the widest need; there the joining rows' tokens are packed, none padded, into forwards
  of at most PREFILL_GROUP_TOKENS, and in each forward every row already in the batch takes its
  decode step (chunked prefill: Engine._prefill_packed);
- prompt prefixes that joining rows share (the template's head, a document asked several questions)
  are prefilled once and kept while the next rows use them (batch.prefix): a row prefills only its
  own suffix, attending to the prefix's columns, and its slot gets both (batching.share_prefix); an
  eager decode step whose rows all start from one such prefix reads its columns once for all of
  them rather than every slot's copy (batch.decode_attention.shared_attention, where it pays);
- a decode step (batch.decode_step) runs the forward, chooses every row's next token (greedy or
  sampled: batch.sampling) and flags EOS / length on the device, and the host reads its tokens once.
  On a GPU with model.cuda_graphs (the default) the step runs at fixed shapes -- a power-of-two
  bucket of rows over the whole cache buffer -- is replayed as a CUDA graph, and runs one step ahead
  of the host: step n+1 is launched before the host reads step n's tokens (a row that finished at
  step n computed one token for nothing). On the CPU (and a GPU without graphs) the step computes
  exactly the running rows over the columns they fill, and its tokens are read before the next step
  (but in a join's forwards, whose rows are read after the join: a row that ends in one of them is
  computed in the next ones for nothing, within its own extent).
  On a GPU a step's attention reads each row's own keys only (batch.decode_attention), where the
  kernel for it checks out;
- sampling is counter-based (sampling.choose): a row's k-th token depends only on its logits, its
  seed (generation.seed and the row's id) and k, so a row samples the same tokens whichever rows
  share its step, in a resumed run, and after an out-of-memory split.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from batch.config import BatchingConfig, GenerationSettings, ModelConfig
from batch.decode_attention import (RowKeys, SharedColumns, check, check_packed, check_read_once, efficient_attention_kernel, planless_sdpa, reading_rows,
                                    reads_once)
from batch.decode_step import DecodeStep, row_bucket
from batch.errors import first_line
from batch.kv_cache import IDS, LIMIT, POS, START, ExtentCache, SlotCache, compact_order, front_first, left_aligned, to_device
from batch.loading import load_model
from batch.memory import is_out_of_memory, running_limits
from batch.prefix import Prefixes, Sharing, Use, aligned_columns, past_inputs, prefill_mask
from batch.results import Completion
from batch.results import error_completion as _error_row
from batch.stops import StopRule


PREFILL_WASTE = 0.05  # a prefill group computes at most 5% padding ...
PREFILL_GROUP_TOKENS = 8192  # ... and at most this many positions (bounds the attention's scratch memory)


def prefill_groups(lengths: list[int], past: list[int] | None = None) -> list[tuple[int, int]]:
    """Split prompt lengths sorted longest first into consecutive [a, b) groups with little padding.
    `past`: the columns of shared prefix each row attends to (batch.prefix): a group's cache holds
    rows x (longest past + longest prompt) positions, within PREFILL_GROUP_TOKENS too."""
    groups, start, real, widest = [], 0, 0, 0
    for i, n in enumerate(lengths):
        padded = (i - start + 1) * lengths[start]
        widest = max(widest, past[i] if past else 0)
        if i > start and (padded * (1 - PREFILL_WASTE) > real + n or (i - start + 1) * (lengths[start] + widest) > PREFILL_GROUP_TOKENS):
            groups.append((start, i))
            start, real, widest = i, 0, past[i] if past else 0
        real += n
    groups.append((start, len(lengths)))
    return groups


REMAKE_GAIN = 4  # with rows running, the cache's buffers are remade for a quarter more places at least:
# a remake copies the running rows' cache and, on a GPU, drops the decode step's captured graphs
REFILL_FRACTION = 8  # new rows join when 1/8 of the batch's places are free: one prefill per finished
# row would cost a forward pass each (on a GPU, as much as a decode step of the whole batch)


@dataclass
class Request:
    key: object  # the caller's name for the row, handed back with its Completion
    ids: list[int]
    seed: int


class Requests:
    """Rows waiting for a place in the running batch, in order. The engine looks at the next one
    (does it fit?) before it takes it."""

    def __init__(self, requests: Iterable[Request]):
        self._it = iter(requests)
        self._next: list[Request] = []

    def peek(self) -> Request | None:
        if not self._next:
            try:
                self._next = list(itertools.islice(self._it, 1))
            except Exception as e:  # the caller's own failure, not generation's: not to be retried
                raise SourceFailed(e) from e
        return self._next[0] if self._next else None

    def take(self) -> Request:
        request = self.peek()
        self._next = self._next[1:]
        return request

    def put_back(self, requests: list[Request]) -> None:
        """Rows taken that are to come next after all, in this order."""
        self._next = list(requests) + self._next


@dataclass(eq=False)
class Running:
    request: Request
    generated: list[int] = field(default_factory=list)
    done: bool = False  # finished and handed back (a step launched ahead may still hold a token of it)


@dataclass
class Report:
    """A launched step's chosen tokens, on their way to the host: `rows` are the rows of its first
    columns (a decode step's slots, or the rows a prefill added), the rest is padding."""

    rows: list[Running]
    values: torch.Tensor  # [2, >= len(rows)]: the tokens, and whether each is EOS or the last allowed
    ready: torch.cuda.Event | None = None  # recorded after the copy to the host (None: on the host already)

    def read(self) -> tuple[list[int], list[int]]:
        if self.ready is not None:
            self.ready.synchronize()
        tokens, done = self.values.tolist()
        return tokens, done


class SourceFailed(Exception):
    """The iterator of requests raised (passed through the engine and SafeGenerator unchanged)."""


class BatchFailed(Exception):
    """Generation failed with `cause`; `unfinished` are the rows it was generating (to be redone)."""

    def __init__(self, cause: Exception, unfinished: list[Request]):
        super().__init__(str(cause))
        self.cause, self.unfinished = cause, unfinished


def row_seed(seed: int, row_id: str) -> int:
    """A row's sampling seed: stable across runs, batches and machines."""
    digest = hashlib.sha256(f"{seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Engine:
    """`fixed_shapes` makes decode steps compute a power-of-two bucket of rows over the whole KV-cache
    buffer and run one step ahead of the host; on a GPU with `cuda_graphs` (the default there) they
    are replayed as CUDA graphs. Otherwise a step computes exactly the running rows over their columns,
    and the host reads its tokens before the next step (the CPU's way, and a GPU's without graphs)."""

    def __init__(self, model, tokenizer, settings: GenerationSettings, cuda_graphs: bool = True, fixed_shapes: bool | None = None,
                 rows_kernel: Callable | None = None, share_prefix: bool = True, extents: bool | None = None, packed_prefill: bool | None = None,
                 read_once: bool | None = None):
        self.model = model
        self.share_prefix = share_prefix  # joining rows' shared token prefixes prefilled once (batch.prefix)
        self.prefixes = Prefixes()
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = model.device
        self.pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.unk_token_id, 0) if t is not None)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        self.vocab = model.config.vocab_size  # the logits' width
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False) if settings.stop else None
        self.rule = StopRule(self.decode, settings.stop, self.eos_ids, settings.stop_token_ids, tokenizer.all_special_ids,
                             settings.min_new_tokens, settings.include_stop_str_in_output, pieces)
        # transformers 5.2x renamed forward's `past_key_values` to `cache`; accept either release
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_kwarg = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        # decode steps hand attention a ready 4D mask: boolean for sdpa, additive for eager attention
        attention = getattr(model.config, "_attn_implementation", None) or "eager"
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"komt-batch decodes with sdpa or eager attention, not {attention}")
        mask_dtype = None if attention == "sdpa" else model.get_input_embeddings().weight.dtype
        self.mask_dtype = mask_dtype  # (prefill's masks too: batch.prefix.prefill_mask)
        cuda = self.device.type == "cuda"
        self.fixed_shapes = cuda and cuda_graphs if fixed_shapes is None else fixed_shapes
        self.lookahead = 1 if self.fixed_shapes else 0  # decode steps launched before the host reads the previous one's tokens
        if cuda and attention == "sdpa":
            print(f"komt-batch: {planless_sdpa()}", file=sys.stderr, flush=True)
        if rows_kernel is None and cuda and attention == "sdpa":  # (the CPU's decode steps read only the columns their rows fill)
            rows_kernel = _checked_rows_kernel(self.device, model.get_input_embeddings().weight.dtype, model.config)
        # each row holds only its own need of the KV cache (ExtentCache), where decode attention reads each row's own keys
        self.extents = rows_kernel is not None if extents is None else extents
        if self.extents and rows_kernel is None:
            raise ValueError("a cache of extents needs decode attention over each row's own keys (rows_kernel)")
        # ... and prefill packs the joining rows' tokens into one sequence, written straight into their extents, where the kernel does that
        self.rows_kernel = rows_kernel
        self.packed_prefill = self.extents and (packed_prefill if packed_prefill is not None else _checked_packed_prefill(rows_kernel, model))
        kv_heads, head_dim = _kv_shape(model.config)
        self._like = [torch.empty((1, kv_heads, 0, head_dim), dtype=model.get_input_embeddings().weight.dtype, device=self.device)] * model.config.num_hidden_layers
        self.step = DecodeStep(self._logits, settings, sorted(self.eos_ids | set(settings.stop_token_ids)), self.device, mask_dtype, graphs=cuda and cuda_graphs and self.fixed_shapes,
                               rows_kernel=rows_kernel)
        # time in the model's prefills, decode steps, and decode steps that captured a CUDA graph
        self.seconds = {"prefill": 0.0, "decode": 0.0, "capture": 0.0}
        self._timings: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # GPU timings not read yet
        self.row_steps = 0  # row x decode steps computed (for the decode-efficiency figure; padding not counted)
        self.steps = 0  # decode steps (row_steps / steps: the running batch's mean size)
        self.padded_prompt_tokens = 0  # prompt positions computed, padding included (prefill efficiency)
        self.prefills = 0  # prefill forwards (padded_prompt_tokens / prefills: the positions of one)
        self.shared_prompt_tokens = 0  # rows' prompt tokens whose keys and values were copied from a shared prefix
        self.prefilled_prompt_tokens = 0  # prompt tokens computed: rows' own suffixes and shared prefixes, once each
        self.shared_reads = 0  # decode steps that read their rows' common prefix once (decode_attention: shared_attention, rows_attention)
        self.mixed_steps = 0  # decode steps the rows in the batch took in a packed prefill's forward (timed as prefill)
        # ... an eager step's with sdpa's boolean mask and no kernel of its own (the CPU's way), or a step over
        # extents whose kernel gives each part's log-sum-exp (a GPU's, graph or not)
        if self.extents:  # (`read_once`: None, where the kernel's check passes; only a cache of extents takes it)
            self.read_once = share_prefix and (read_once if read_once is not None else _checked_read_once(rows_kernel, model))
        else:
            self.read_once = share_prefix and not self.fixed_shapes and rows_kernel is None and mask_dtype is None
        self.between_steps: Callable[[], None] | None = None  # called on the host before each step (the runner's CPU watch)

    @property
    def prefill_seconds(self) -> float:
        return self.seconds["prefill"]

    @property
    def decode_seconds(self) -> float:
        """Seconds of decode steps: on a GPU, device time (a replayed step includes the token choice).
        Steps that captured a CUDA graph are apart, in capture_seconds (one-off, host-bound)."""
        return self.seconds["decode"]

    @property
    def decode_steps(self) -> int:
        """The decode steps whose time is in decode_seconds (not those taken in a packed prefill's forward)."""
        return self.steps - self.step.captures - self.mixed_steps

    @property
    def capture_seconds(self) -> float:
        return self.seconds["capture"]

    @property
    def forward_seconds(self) -> float:
        """Time inside the model's forward calls, captures included (for the overhead figure)."""
        return self.seconds["prefill"] + self.seconds["decode"] + self.seconds["capture"]

    @classmethod
    def load(cls, cfg: ModelConfig, settings: GenerationSettings, where: str = "<job>", tokenizer=None, share_prefix: bool = True) -> Engine:
        return cls(*load_model(cfg, where, tokenizer), settings, cuda_graphs=cfg.cuda_graphs, share_prefix=share_prefix)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """Token ids as the tokenizer makes them by default (for Llama: with BOS)."""
        return self.tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []

    def finish(self, prompt: list[int], generated: list[int]) -> Completion:
        """The stop rule (batch.stops) on a row that has ended: its Completion."""
        response, reason, stop_reason = self.rule.finish(prompt, generated)
        return Completion(response, reason, len(prompt), len(generated), stop_reason=stop_reason)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], seeds: list[int]) -> list[Completion]:
        """Generate for one batch of tokenized prompts, all in at once; one Completion per prompt, in order."""
        requests = Requests(Request(i, p, seed) for i, (p, seed) in enumerate(zip(prompts, seeds)))
        out: list[Completion] = [None] * len(prompts)  # type: ignore[list-item]
        try:
            # (all rows at once: as many slots, or extents, of the widest need as there are prompts, and their prefixes)
            budget = len(prompts) * (max(map(len, prompts), default=0) + self.settings.max_new_tokens) + sum(map(len, prompts))
            for i, completion in self.stream(requests, max_rows=len(prompts), budget=budget):
                out[i] = completion
        except BatchFailed as failed:
            raise failed.cause from None
        return out

    @torch.inference_mode()
    def stream(self, requests: Requests, max_rows: int, budget: int) -> Iterator[tuple[object, Completion]]:
        """Generate for a stream of rows (best sorted longest first), at most `max_rows` at a time and
        within `budget` cache tokens (rows x (longest prompt + max_new_tokens), and the shared prefixes
        kept); yield (key, Completion) as
        each row finishes. A finished row leaves the batch at once, and new rows join when an eighth
        of the places are free, so the batch stays full. Raises BatchFailed with the unfinished rows."""
        batch = (ExtentCache if self.extents else SlotCache)(self.model.config, self.device, self.vocab if self.settings.repetition_penalty != 1.0 else 0)
        running: list[Running] = []  # slot -> row (a row stays until its tokens are read and it is done)
        pending: deque[Report] = deque()  # launched steps whose tokens the host has not read, oldest first
        joining: list[Request] = []
        try:
            while True:
                if self.between_steps is not None:
                    self.between_steps()
                while len(pending) > self.lookahead:  # read all but the newest `lookahead` steps
                    yield from self._settle(pending.popleft(), batch, running)
                rows_budget = self._rows_budget(requests, batch, budget)
                joining = self._joining(requests, batch, max_rows, rows_budget)
                if joining:
                    reports = self._join(batch, joining, requests, max_rows, budget, running)
                    running += reports[-1].rows[-len(joining) :]  # (the last report's rows end with all the joining rows)
                    pending += reports
                    joining = []
                    continue  # (with no step ahead, the last forward's rows' first tokens are read before they decode: one may end a row)
                if running:
                    pending.append(self._decode(batch, running))
                elif requests.peek() is None:
                    self._read_timings(wait=True)
                    return
        except SourceFailed as e:
            raise e.__cause__ from None
        except Exception as e:  # noqa: BLE001 -- the caller decides: split, retry or error rows
            unfinished = [r.request for r in running if not r.done] + joining
            # Free this batch's KV cache, graphs and activations before the rows are redone (after an
            # out-of-memory error above all): the exception's traceback would keep them alive.
            batch = pending = None
            self.prefixes.clear()
            self._timings.clear()
            traceback.clear_frames(e.__traceback__)
            raise BatchFailed(e, unfinished) from e
        finally:
            self.step.release()  # (graphs hold a memory pool)
            self.prefixes.clear()

    def _settle(self, report: Report, batch: SlotCache, running: list[Running]) -> Iterator[tuple[object, Completion]]:
        """Read a step's tokens; the rows they finish leave the batch (and are yielded)."""
        tokens, flags = report.read()
        self._read_timings()
        finished = []
        for row, token, flag in zip(report.rows, tokens, flags):
            if row.done:  # it finished at an earlier step: this token was computed ahead for nothing
                continue
            row.generated.append(token)
            if flag or self.rule.hit(row.request.ids, row.generated):
                finished.append(row)
        if finished:
            # (what can fail runs while `running` still holds them: on failure they are redone)
            done = [(row.request.key, self.finish(row.request.ids, row.generated)) for row in finished]
            for row in finished:
                row.done = True
            order = compact_order([slot for slot, row in enumerate(running) if not row.done])
            batch.select(order)
            running[:] = [running[k] for k in order]
            yield from done

    def _decode(self, batch: SlotCache, running: list[Running]) -> Report:
        """Launch one decode step for the running rows (padded to a bucket with fixed shapes)."""
        n = len(running)
        self.steps += 1
        self.row_steps += n
        captures = self.step.captures
        shared = self.prefixes.read_once(batch.prefix[:n]) if self.read_once else None
        if shared:  # (the columns a row reads: in slots, every row the widest's; in extents, its own: on average)
            columns = sum(batch.pos[:n]) / n + 1 if self.extents else batch.used + 1
            shared = shared if reads_once(n, shared[1], columns) else None
        batch.shared = SharedColumns(*shared, key=batch.prefix[0][1]) if shared else None
        self.shared_reads += batch.shared is not None
        with self._timed("decode") as timing:
            values = self.step(batch, row_bucket(n, batch.slots) if self.fixed_shapes else n, whole=self.fixed_shapes)
            if self.step.captures != captures:
                timing[0] = "capture"
        batch.advance()
        return self._report(list(running), values)

    def _joining(self, requests: Requests, batch: SlotCache, max_rows: int, budget: int) -> list[Request]:
        """The next rows to join the batch: when enough places are free to be worth a prefill, as many
        as fit. A row needs its prompt + max_new_tokens columns; the places: max_rows, or fewer where
        the token budget binds at the widest need (rows x columns <= budget). While rows are running,
        the cache's buffer is remade only for a quarter more places, or for a row that needs more
        columns than it has (if the budget holds the running rows at that width)."""
        if self.extents:
            return self._joining_extents(requests, batch, max_rows, budget)
        room = self.settings.max_new_tokens
        n, need = batch.n, max(batch.need, default=0)
        if (r := requests.peek()) is None:
            return []
        wider = max(need, len(r.ids) + room)
        places = min(max_rows, budget // wider)
        remake = not n  # (with no rows running, reserve remakes the buffer if it is too small or too narrow)
        if n:
            remake = wider > batch.columns or places >= batch.slots + max(1, batch.slots // REMAKE_GAIN)
            if not remake:
                places = min(places, batch.slots)
            if places - n < max(1, places // REFILL_FRACTION):
                return []
        out: list[Request] = []
        while n + len(out) < max(places, 1) and (r := requests.peek()) is not None:
            wider = max(need, len(r.ids) + room)
            if (n or out) and (n + len(out) + 1) * wider > budget:
                break
            if not remake and wider > batch.columns:
                break
            out.append(requests.take())
            need = wider
        return out

    def _joining_extents(self, requests: Requests, batch: ExtentCache, max_rows: int, budget: int) -> list[Request]:
        """_joining for a cache of extents: the next rows, in order, while a place is free and a free
        range of the buffer fits each row's need (their extents are taken: batch.waiting). With rows
        running, they join only if they are an eighth of the places, or take an eighth of the buffer,
        or are the last rows (else they wait for more room, and their extents are given back)."""
        room, n = self.settings.max_new_tokens, batch.n
        out: list[Request] = []
        starts: list[int] = []
        while n + len(out) < max_rows and (r := requests.peek()) is not None:
            placed = batch.place([len(r.ids) + room], budget, max_rows)
            if placed is None:
                break
            out.append(requests.take())
            starts += placed
        needs = [len(r.ids) + room for r in out]
        if n and out and requests.peek() is not None and len(out) < max(1, max_rows // REFILL_FRACTION) and sum(needs) < batch.tokens // REFILL_FRACTION:
            batch.give_back(starts, needs)
            requests.put_back(out)
            return []
        batch.waiting = {id(r): start for r, start in zip(out, starts)}
        return out

    def _rows_budget(self, requests: Requests, batch: SlotCache, budget: int) -> int:
        """The token budget left for the rows' slots beside the shared prefixes held. With no row
        running, prefixes that leave too little for the next row are dropped (it may start from none)."""
        held = self.prefixes.tokens
        r = requests.peek()
        if held and not batch.n and r is not None and budget - held < len(r.ids) + self.settings.max_new_tokens:
            self.prefixes.clear()
            held = 0
        return max(1, budget - held)

    def _join(self, batch: SlotCache, joining: list[Request], requests: Requests, max_rows: int, budget: int,
              running: list[Running]) -> list[Report]:
        """Prefill the joining rows into the batch's cache and choose their first tokens. Prefixes they
        share are computed once first (batch.prefix), then each row prefills only its own suffix
        after its prefix's columns (in groups of near-equal length, or packed into a cache of
        extents), and its slot gets both, left-aligned. The prefixes are kept for the next rows if
        the slots leave room for them in `budget`. Returns the reports of its forwards, in order: the
        joining rows' first tokens, after the next ones of the rows that took a decode step in that
        forward (packed: the running rows and those joined in the forwards before); the last report's
        rows end with all the joining rows."""
        sharing = self._sharing(joining, requests)
        kept = sorted(sharing.used(), key=len)  # the prefixes held after this join, if the budget has room for them
        n, room = batch.n, self.settings.max_new_tokens
        need = max(max(batch.need, default=0), max(len(r.ids) for r in joining) + room)
        fit = max(n + 1, (budget - sum(map(len, kept))) // need)
        if kept and not self.extents and not (batch.slots >= n + len(joining) and batch.columns >= need) and n + len(joining) > fit:
            # a new buffer: fewer rows join now, so that it leaves room to keep the prefixes for the next ones
            requests.put_back(joining[fit - n :])
            del joining[fit - n :]
            sharing = self._sharing(joining, requests)
            kept = sorted(sharing.used(), key=len)
        elif kept and self.extents and not n and batch.tokens > budget - sum(map(len, kept)):
            self._leave_room(batch, joining, requests, budget - sum(map(len, kept)), max_rows)
            sharing = self._sharing(joining, requests)
            kept = sorted(sharing.used(), key=len)
        for level in sharing.levels:
            self._make_prefixes(level)
        uses = sorted(zip(joining, sharing.rows), key=lambda ru: -(len(ru[0].ids) - (ru[1].k if ru[1] else 0)))
        joining[:] = [r for r, _ in uses]
        uses = [u for _, u in uses]
        joined = [Running(r) for r in joining]
        if self.packed_prefill:
            reports = self._prefill_packed(batch, joining, joined, uses, running, budget - sum(map(len, kept)), max_rows)
        else:
            chosen = self._prefill_groups(batch, joining, uses, n, budget - sum(map(len, kept)), max_rows)
            reports = [self._report(joined, torch.cat(chosen, dim=1))]
        spare = budget - batch.tokens
        self.prefixes.keep({key for key, total in zip(kept, itertools.accumulate(map(len, kept))) if total <= spare})  # (shortest first)
        return reports

    def _leave_room(self, batch: ExtentCache, joining: list[Request], requests: Requests, room: int, max_rows: int) -> None:
        """With no row running: a buffer of extents of `room` columns, so that the prefixes to keep for
        the next rows fit in the budget beside it. The joining rows (placed from its first column, in
        order) that fit it are placed anew; the others are put back (at least one stays)."""
        needs = [len(r.ids) + self.settings.max_new_tokens for r in joining]
        fit = max(1, sum(total <= room for total in itertools.accumulate(needs)))
        requests.put_back(joining[fit:])
        del joining[fit:]
        batch.extents = None
        batch.waiting = dict(zip(map(id, joining), batch.place(needs[:fit], room, max_rows)))

    def _prefill_groups(self, batch: SlotCache, joining: list[Request], uses: list[Use | None], n: int, budget: int, max_rows: int) -> list[torch.Tensor]:
        """Prefill joining rows (longest suffix first) in groups of near-equal length, left-padded, each
        after its shared prefix's columns as the past; each group's keys and values then go into the
        rows' slots (or extents), left-aligned. Returns each group's first tokens."""
        room = self.settings.max_new_tokens
        lengths = [len(r.ids) for r in joining]
        shared = [u.k if u else 0 for u in uses]
        chosen = []
        for a, b in prefill_groups([length - k for length, k in zip(lengths, shared)], shared):
            logits, layers, source, fixed = self._prefill([r.ids for r in joining[a:b]], uses[a:b], rows=True)
            if a == 0:
                need = max(max(batch.need, default=0), max(lengths) + room)
                batch.reserve(n + len(joining), need, [k for k, _ in layers], budget, max_rows)
            placed = {"starts": [batch.waiting.pop(id(r)) for r in joining[a:b]]} if self.extents else {}
            batch.add(n + a, lengths[a:b], [length + room for length in lengths[a:b]], layers, [r.seed for r in joining[a:b]], source, fixed,
                      [self.prefixes.tag(u) for u in uses[a:b]], **placed)
            batch.see(n + a, [r.ids for r in joining[a:b]])
            chosen.append(self.step.pick(logits, batch.state[:, n + a : n + b], None if batch.seen is None else batch.seen[n + a : n + b]))
        return chosen

    def _prefill_packed(self, batch: ExtentCache, joining: list[Request], joined: list[Running], uses: list[Use | None],
                        running: list[Running], budget: int, max_rows: int) -> list[Report]:
        """Prefill joining rows into a cache of extents: each row's shared prefix is copied into its
        extent, then the rows' own suffixes, their tokens packed into one sequence (none padded) in
        forwards of at most PREFILL_GROUP_TOKENS tokens, write their keys and values straight into
        their extents (batch.decode_attention.packed_attention). The rows in the batch ride along in
        each forward, one token each: the running rows and those joined in the forwards before (their
        first token chosen): that is their decode step (the weights read once for both), so that no
        row waits for the rest of the join (chunked prefill). Returns each forward's report: the
        tokens of that step (if any rows took it) and the forward's rows' first tokens (`joined`:
        the joining rows' Running). Each is one report, so a step launched ahead of the host is the
        next decode step, not one of these."""
        room, n = self.settings.max_new_tokens, batch.n
        lengths = [len(r.ids) for r in joining]
        shared = [u.k if u else 0 for u in uses]
        starts = [batch.waiting.pop(id(r)) for r in joining]
        batch.reserve(n + len(joining), max(max(batch.need, default=0), max(lengths) + room), self._like, budget, max_rows)
        batch.write_prefixes(starts, uses, self.prefixes.nodes)
        self.shared_prompt_tokens += sum(shared)
        reports = []
        for a, b in packed_chunks([length - k for length, k in zip(lengths, shared)]):
            decode, chosen = n + a, []  # the rows in slots [0, n + a) take a decode step in this forward
            logits = self._packed_forward(batch, [r.ids for r in joining[a:b]], shared[a:b], starts[a:b], decode)
            if decode:
                self.steps += 1
                self.mixed_steps += 1
                self.row_steps += decode
                chosen.append(self.step.pick_and_advance(logits[:decode], batch.state[:, :decode], None if batch.seen is None else batch.seen[:decode]))
                batch.advance()
            batch.join(n + a, lengths[a:b], [length + room for length in lengths[a:b]], [r.seed for r in joining[a:b]], starts[a:b],
                       [self.prefixes.tag(u) for u in uses[a:b]])
            batch.see(n + a, [r.ids for r in joining[a:b]])
            chosen.append(self.step.pick(logits[decode:], batch.state[:, n + a : n + b], None if batch.seen is None else batch.seen[n + a : n + b]))
            reports.append(self._report([*running, *joined[:b]], torch.cat(chosen, dim=1)))
        return reports

    def _packed_forward(self, batch: ExtentCache, prompts: list[list[int]], shared: list[int], starts: list[int], decode: int = 0) -> torch.Tensor:
        """One forward of the rows' suffixes (after their first `shared` tokens, in their extents
        already) packed into one sequence: each token at its row's position, its key and value
        written at its row's column of that position. `decode`: running rows [0, decode) go first,
        one token each (their next input, at their position: a decode step's). Returns each row's
        last logits [decode + rows, vocab]."""
        counts = [len(p) - k for p, k in zip(prompts, shared)]
        ids = torch.tensor([t for p, k in zip(prompts, shared) for t in p[k:]], dtype=torch.long)
        # token i of the packed suffixes, row r's j-th: position shared[r] + j, column starts[r] + that
        # (a handful of ops whatever the rows: the host's work per forward grows with layers, not rows)
        firsts = list(itertools.accumulate(counts, initial=0))[:-1]
        offsets = torch.tensor([[k - f for k, f in zip(shared, firsts)], [s + k - f for s, k, f in zip(starts, shared, firsts)]])
        positions, columns = torch.arange(len(ids)) + torch.repeat_interleave(offsets, torch.tensor(counts), dim=1)
        ends = torch.tensor(counts).cumsum(0) + decode
        lengths = [len(p) for p in prompts]
        # the kernel's sequences (one copy to the device): where each row's queries start in the packed
        # tokens, where its keys start in the buffer, and how many keys it reads (the running rows': below)
        sequences = torch.tensor([[*range(decode), decode, *ends.tolist()], [0] * decode + [*starts, batch.extents.capacity],
                                  [0] * decode + [*lengths, 0]], dtype=torch.int32)
        last = torch.cat([torch.arange(decode), ends - 1])
        ids, positions, columns, last, sequences = (to_device(t, self.device) for t in (ids, positions, columns, last, sequences))
        query_starts, key_starts, key_counts = sequences
        if decode:  # (from the device state: the running rows' next inputs may not have reached the host yet)
            state = batch.state[:, :decode]
            position = torch.minimum(state[POS], state[LIMIT])  # (a row computed past its end stays in its extent)
            ids, positions = torch.cat([state[IDS], ids]), torch.cat([position, positions])
            columns = torch.cat([state[START] + position, columns])
            key_starts[:decode], key_counts[:decode] = state[START], position + 1
        batch.prefill(columns)
        widest = max(lengths + ([batch.columns] if decode else []))
        keys = RowKeys(key_counts[:-1], self.rows_kernel, key_starts, widest, query_starts, max(counts))
        self.padded_prompt_tokens += sum(counts)
        self.prefills += 1
        self.prefilled_prompt_tokens += sum(counts)
        with self._timed("prefill"):
            return self._logits(ids[None], torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.device), positions[None], batch.cache, keys, keep=last)

    def _sharing(self, joining: list[Request], requests: Requests) -> Sharing:
        """The prefixes the joining rows share (batch.prefix), and what they extend of those held. The
        next row to come counts too: a prefix it shares with these is made now and kept for it."""
        if not self.share_prefix:
            return Sharing(rows=[None] * len(joining))
        coming = requests.peek()
        sharing = self.prefixes.plan([r.ids for r in joining] + ([coming.ids] if coming else []))
        sharing.rows = sharing.rows[: len(joining)]
        return sharing

    def _make_prefixes(self, level: list[tuple[tuple[int, ...], Use | None]]) -> None:
        """Compute a level of shared prefixes (each after the prefix it extends) and keep their keys and values."""
        level = sorted(level, key=lambda node: -(len(node[0]) - (node[1].k if node[1] else 0)))
        shared = [u.k if u else 0 for _, u in level]
        for a, b in prefill_groups([len(key) - k for (key, _), k in zip(level, shared)], shared):
            _, layers, source, _ = self._prefill([list(key) for key, _ in level[a:b]], [u for _, u in level[a:b]], rows=False)
            aligned = [(left_aligned(k, source), left_aligned(v, source)) for k, v in layers]
            for i, (key, _) in enumerate(level[a:b]):
                self.prefixes.add(key, [(k[i : i + 1, :, : len(key)].clone(), v[i : i + 1, :, : len(key)].clone()) for k, v in aligned])

    def _prefill(self, prompts: list[list[int]], uses: list[Use | None], rows: bool):
        """One prefill forward: each prompt's tokens after its shared prefix (a Use, or None), that
        prefix's keys and values as the past. Returns the last position's logits, each layer's
        (keys, values) of past + group, and where each row's columns are in them: `source`, for
        columns from `fixed` on (aligned_columns; for rows, where every row's past fills the same
        `fixed` columns, the columns before are in place already: front_first of the suffixes)."""
        shared = [u.k if u else 0 for u in uses]
        suffixes = [p[k:] for p, k in zip(prompts, shared)]
        past, past_mask = self.prefixes.past(uses)
        ids, mask, positions = past_inputs(suffixes, past_mask, self.pad_id)
        plain = not past_mask.shape[1] and bool(mask.all())  # (the host's copy: asking the device would wait for it)
        ids, mask, positions = (to_device(t, self.device) for t in (ids, mask, positions))
        mask = None if plain else prefill_mask(mask, past_mask.shape[1], self.mask_dtype)
        group = cache_from(past, self.model.config)
        del past  # (the group's cache holds them until its forward appends to them: then they are freed)
        self.padded_prompt_tokens += ids.numel()
        self.prefills += 1
        self.prefilled_prompt_tokens += sum(map(len, suffixes))
        if rows:
            self.shared_prompt_tokens += sum(shared)
        with self._timed("prefill"):
            logits = self._logits(ids, mask, positions, group)
        width = past_mask.shape[1]
        fixed = width if rows and width and all(k == width for k in shared) else 0
        lengths = [len(s) for s in suffixes]
        source = front_first(lengths, ids.shape[1], self.device) if fixed else to_device(aligned_columns(shared, lengths, width, ids.shape[1]), self.device)
        return logits, [(g.keys, g.values) for g in group.layers], source, fixed

    def _logits(self, ids, mask, positions, cache, row_keys: RowKeys | None = None, shared: SharedColumns | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """The last position's logits; with `row_keys` (a decode step's, or a packed prefill's), attention
        reads each row's own keys; with `shared`, the columns all rows share once (batch.decode_attention);
        `keep`: the logits of these positions of the one sequence ids [1, T] (a packed prefill's rows' last)."""
        extra = {self.cache_kwarg: cache} | ({"row_keys": row_keys} if row_keys is not None else {})
        extra |= {"shared_columns": shared} if shared is not None else {}
        with reading_rows(self.model.config) if row_keys is not None or shared is not None else contextlib.nullcontext():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1 if keep is None else keep, **extra)
        return out.logits[:, -1, :].float() if keep is None else out.logits[0].float()

    def _report(self, rows: list[Running], values: torch.Tensor) -> Report:
        """Start the copy of a step's tokens to the host (from a GPU into pinned memory, without waiting
        for it). A copy also on the CPU: a replayed graph's output changes at the next replay."""
        host = values.to("cpu", non_blocking=True, copy=True)
        if not values.is_cuda:
            return Report(rows, host)
        ready = torch.cuda.Event()
        ready.record()
        return Report(rows, host, ready)

    @contextlib.contextmanager
    def _timed(self, kind: str):
        """Time the model's work: wall time on the CPU; CUDA events on a GPU (read once they have
        happened, so that timing adds no host sync)."""
        tag = [kind]  # the block may re-tag its time (a step that captured a graph)
        if self.device.type != "cuda":
            start = time.perf_counter()
            yield tag
            self.seconds[tag[0]] += time.perf_counter() - start
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield tag
        end.record()
        self._timings.append((tag[0], start, end))

    def _read_timings(self, wait: bool = False) -> None:
        while self._timings and (wait or self._timings[0][2].query()):
            kind, start, end = self._timings.pop(0)
            end.synchronize()
            self.seconds[kind] += start.elapsed_time(end) / 1000


class SafeGenerator:
    """Engine.stream with the failures of one batch contained.

    - Out of memory: split the rows that were running in halves and redo them, down to one row; lower
      the token budget for the rows that follow. A single row that still does not fit becomes an
      error row.
    - Any other exception: redo the rows one by one, so only the row that really fails becomes an
      error row.
    Row seeds travel with their rows, so a redone row samples what it would have in the batch.
    """

    def __init__(self, engine: Engine, max_batch_size: int, max_batch_tokens: int, max_new_tokens: int):
        self.engine = engine
        self.max_rows = max_batch_size
        self.budget = max_batch_tokens
        self.max_new = max_new_tokens
        self.oom_splits = 0
        self.lowered_budget: int | None = None

    @classmethod
    def for_job(cls, engine: Engine, batching: BatchingConfig, max_new_tokens: int) -> SafeGenerator:
        """The running batch's limits for this job on this device (batch.memory): rows at once and
        their token budget; the choice is logged."""
        rows, tokens, line = running_limits(batching, engine.model, max_new_tokens)
        print(line, file=sys.stderr, flush=True)
        return cls(engine, rows, tokens, max_new_tokens)

    def cost(self, prompts: list[list[int]]) -> int:
        return len(prompts) * (max(len(p) for p in prompts) + self.max_new)

    def stream(self, requests: Iterable[Request]) -> Iterator[tuple[object, Completion]]:
        source = Requests(requests)
        while True:
            try:
                yield from self.engine.stream(source, self.max_rows, self.budget)
                return
            except BatchFailed as failed:
                rows = failed.unfinished
                redone = self._recover(failed.cause, [r.ids for r in rows], [r.seed for r in rows])
                yield from ((r.key, c) for r, c in zip(rows, redone))

    def _generate(self, prompts: list[list[int]], seeds: list[int]) -> list[Completion]:
        try:
            return self.engine.generate(prompts, seeds)
        except Exception as e:  # noqa: BLE001 -- every failure becomes split, retry or an error row
            return self._recover(e, prompts, seeds)

    def _recover(self, e: Exception, prompts: list[list[int]], seeds: list[int]) -> list[Completion]:
        if is_out_of_memory(e):
            _free_memory()
            if len(prompts) == 1:
                return [error_completion(prompts[0], f"oom: out of memory even alone ({len(prompts[0])} prompt tokens)")]
            self.oom_splits += 1
            self.budget = max(1, min(self.budget, self.cost(prompts) // 2))
            self.lowered_budget = self.budget
            print(f"komt-batch: out of memory on {len(prompts)} rows: splitting; batching.max_batch_tokens lowered to {self.budget} for the rest of this run", file=sys.stderr)
            half = len(prompts) // 2
            return self._generate(prompts[:half], seeds[:half]) + self._generate(prompts[half:], seeds[half:])
        if len(prompts) == 1:
            return [error_completion(prompts[0], f"generation: {type(e).__name__}: {first_line(e)}")]
        return [c for p, s in zip(prompts, seeds) for c in self._generate([p], [s])]


def _checked_rows_kernel(device, dtype, config) -> Callable | None:
    """The kernel for decode attention over each row's own keys, if it runs here and gives sdpa's
    output with the model's head shapes (batch.decode_attention.check); the choice is logged."""
    kv_heads, dim = _kv_shape(config)
    ok, why = check(device, dtype, config.num_attention_heads, kv_heads, dim)
    if ok:
        print(f"komt-batch: decode attention: each row reads its own keys only ({why})", file=sys.stderr, flush=True)
        return efficient_attention_kernel
    print(f"komt-batch: decode attention: sdpa over the columns read ({why})", file=sys.stderr, flush=True)
    return None


def _kv_shape(config) -> tuple[int, int]:
    """The model's kv heads and head size."""
    heads = config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def _kernel_also(check: Callable, kernel: Callable, model, what: str, used: str, unused: str) -> bool:
    """Does the decode attention's kernel also do what `check` asks (batch.decode_attention:
    check_packed, check_read_once), giving sdpa's output with the model's head shapes? Logged on a
    GPU: "komt-batch: WHAT: USED or UNUSED (why)"."""
    kv_heads, dim = _kv_shape(model.config)
    ok, why = check(model.device, model.get_input_embeddings().weight.dtype, model.config.num_attention_heads, kv_heads, dim, kernel)
    if model.device.type == "cuda":
        print(f"komt-batch: {what}: {used if ok else unused} ({why})", file=sys.stderr, flush=True)
    return ok


def _checked_packed_prefill(kernel: Callable, model) -> bool:
    return _kernel_also(check_packed, kernel, model, "prefill", "the rows packed, none padded", "groups of near-equal length, padded")


def _checked_read_once(kernel: Callable, model) -> bool:
    return _kernel_also(check_read_once, kernel, model, "decode attention", "a prefix every row shares is read once",
                        "each row reads its own copy of a shared prefix")


def packed_chunks(counts: list[int], tokens: int = 0) -> list[tuple[int, int]]:
    """Consecutive [a, b) runs of rows of these token counts, each of at most `tokens` tokens
    (PREFILL_GROUP_TOKENS), or one row."""
    tokens = tokens or PREFILL_GROUP_TOKENS
    chunks, start, total = [], 0, 0
    for i, n in enumerate(counts):
        if i > start and total + n > tokens:
            chunks.append((start, i))
            start, total = i, 0
        total += n
    chunks.append((start, len(counts)))
    return chunks


def cache_from(past: list[tuple[torch.Tensor, torch.Tensor]], config) -> DynamicCache:
    """A prefill group's cache holding `past` (per layer keys and values) as they are: a DynamicCache's
    own `update` would first copy them (concatenated to its empty tensor), and the forward then
    concatenates its new columns to them anyway."""
    cache = DynamicCache(config=config)
    for layer, (k, v) in zip(cache.layers, past):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def error_completion(prompt: list[int], message: str) -> Completion:
    return _error_row(message, len(prompt))


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
