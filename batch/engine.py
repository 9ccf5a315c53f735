"""Generating: a stream of tokenized prompts in, one Completion per row out (loading: batch.loading).

`Engine.stream` is a small decode loop over transformers' model forward and KV cache:

- prompts are left-padded with a pad id that is masked out everywhere (Llama-2 has no pad token;
  we use <unk>, never eos: pad = eos is what breaks batched Llama output, transformers #25790), and
  position ids count only real tokens, so a padded row computes what it would compute alone;
- every row stops on its own: on EOS, on a stop word (checked incrementally, stops.StopChecker), or
  at max_new_tokens -- and a finished row leaves the batch at once (its rows of the KV cache are
  dropped), so one long answer does not keep the others computing;
- the places of finished rows are refilled from the stream (continuous batching): new rows are
  prefilled and join the running batch, their prompts right-aligned to the current cache column
  (SlotCache), so the batch stays full until the stream runs dry;
- sampling uses transformers' temperature / top-k / top-p warpers and one random generator per row,
  seeded from generation.seed and the row's id: a row's sample does not depend on which rows share
  its batch, so a resumed or re-batched run samples the same tokens.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from batch.config import BatchingConfig, GenerationSettings, ModelConfig
from batch.kv_cache import SlotCache, compact_order
from batch.loading import first_line, load_model
from batch.results import Completion
from batch.results import error_completion as _error_row
from batch.stops import StopChecker, trim_response


PREFILL_WASTE = 0.05  # a prefill group computes at most 5% padding ...
PREFILL_GROUP_TOKENS = 8192  # ... and at most this many positions (bounds the attention's scratch memory)


def prefill_groups(lengths: list[int]) -> list[tuple[int, int]]:
    """Split prompt lengths sorted longest first into consecutive [a, b) groups with little padding."""
    groups, start, real = [], 0, 0
    for i, n in enumerate(lengths):
        padded = (i - start + 1) * lengths[start]
        if i > start and (padded * (1 - PREFILL_WASTE) > real + n or padded > PREFILL_GROUP_TOKENS):
            groups.append((start, i))
            start, real = i, 0
        real += n
    groups.append((start, len(lengths)))
    return groups


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


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
        self._next = []
        return request


@dataclass
class Running:
    request: Request
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)


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
    def __init__(self, model, tokenizer, settings: GenerationSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = model.device
        self.pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.unk_token_id, 0) if t is not None)
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = set(eos)
        self.eos_text = tokenizer.eos_token
        self.special = list(tokenizer.all_special_tokens)
        self.stops = StopChecker(self.decode, settings.stop)
        warpers = []
        if settings.do_sample:
            if settings.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k > 0:
                warpers.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                warpers.append(TopPLogitsWarper(settings.top_p))
        self.warpers = LogitsProcessorList(warpers)
        # transformers 5.2x renamed forward's `past_key_values` to `cache`; accept either release
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_kwarg = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        self.forward_seconds = 0.0  # time inside the model's forward calls (for the overhead figure)
        self.row_steps = 0  # row x decode steps computed (for the decode-efficiency figure)
        self.steps = 0  # decode steps (row_steps / steps: the running batch's mean size)
        self.padded_prompt_tokens = 0  # prompt positions computed, padding included (prefill efficiency)

    @classmethod
    def load(cls, cfg: ModelConfig, settings: GenerationSettings, where: str = "<job>", tokenizer=None) -> Engine:
        return cls(*load_model(cfg, where, tokenizer), settings)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """Token ids as the tokenizer makes them by default (for Llama: with BOS)."""
        return self.tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []

    def finish(self, prompt_len: int, generated: list[int]) -> Completion:
        response, reason = trim_response(self.decode(generated), self.settings.stop, self.eos_text, self.special)
        return Completion(response, reason, prompt_len, len(generated))

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], seeds: list[int]) -> list[Completion]:
        """Generate for one batch of tokenized prompts, all in at once; one Completion per prompt, in order."""
        requests = Requests(Request(i, p, seed) for i, (p, seed) in enumerate(zip(prompts, seeds)))
        out: list[Completion] = [None] * len(prompts)  # type: ignore[list-item]
        try:
            for i, completion in self.stream(requests, max_rows=len(prompts), budget=sys.maxsize):
                out[i] = completion
        except BatchFailed as failed:
            raise failed.cause from None
        return out

    @torch.inference_mode()
    def stream(self, requests: Requests, max_rows: int, budget: int) -> Iterator[tuple[object, Completion]]:
        """Generate for a stream of rows (best sorted longest first), at most `max_rows` at a time and
        within `budget` cache tokens (rows x (columns + max_new_tokens)); yield (key, Completion) as
        each row finishes. A finished row leaves the batch at once, and new rows join when an eighth
        of the places are free, so the batch stays full. Raises BatchFailed with the unfinished rows."""
        batch = SlotCache(self.model.config, self.device)
        running: list[Running] = []
        joining: list[Request] = []
        logits = None
        try:
            while True:
                joining = self._joining(requests, batch, max_rows, budget)
                if joining:
                    new = self._join(batch, joining, max_rows, budget)
                    logits = new if logits is None else torch.cat([logits, new])
                    running += [Running(r, self._generator(r.seed)) for r in joining]
                    joining = []
                if not running:
                    return
                self.row_steps += len(running)
                self.steps += 1
                chosen = self._choose(logits, [r.generator for r in running])
                keep, finished = [], []
                for slot, (row, token) in enumerate(zip(running, chosen.tolist())):
                    row.generated.append(token)
                    (finished if self._stops(row.generated) else keep).append(slot)
                if finished:  # they leave the batch, with their rows of the cache
                    # (what can fail runs while `running` still holds them: on failure they are redone)
                    done = [(running[k].request.key, self.finish(len(running[k].request.ids), running[k].generated)) for k in finished]
                    order = compact_order(keep)
                    batch.select(order)
                    chosen = chosen[torch.tensor(order, dtype=torch.long, device=chosen.device)]
                    running = [running[k] for k in order]
                    yield from done
                logits = None
                if running:
                    mask, positions = batch.step()
                    logits = self._forward(chosen[:, None], mask, positions, batch.cache)
                    batch.advance()
        except SourceFailed as e:
            raise e.__cause__ from None
        except Exception as e:  # noqa: BLE001 -- the caller decides: split, retry or error rows
            unfinished = [r.request for r in running] + joining
            # Free this batch's KV cache and activations before the rows are redone (after an
            # out-of-memory error above all): the exception's traceback would keep them alive.
            batch = logits = chosen = None
            traceback.clear_frames(e.__traceback__)
            raise BatchFailed(e, unfinished) from e

    def _stops(self, generated: list[int]) -> bool:
        return generated[-1] in self.eos_ids or len(generated) >= self.settings.max_new_tokens or self.stops.hit(generated)

    def _generator(self, seed: int) -> torch.Generator | None:
        return torch.Generator(self.device).manual_seed(seed) if self.settings.do_sample else None

    def _joining(self, requests: Requests, batch: SlotCache, max_rows: int, budget: int) -> list[Request]:
        """The next rows to join the batch: when enough places are free to be worth a prefill, as many
        as fit. The places: max_rows, or fewer where the token budget binds at the batch's width.
        While rows are running, the cache's buffer is remade only for an eighth more places; rows that
        would need wider buffers wait for the running rows to leave."""
        room = self.settings.max_new_tokens
        n, width = batch.n, batch.width
        places = min(max_rows, budget // (width + room))
        if n:
            if places < batch.slots + max(1, batch.slots // REFILL_FRACTION):
                places = min(places, batch.slots)
            if places - n < max(1, places // REFILL_FRACTION):
                return []
        columns = batch.columns if n and places <= batch.slots else None  # None: a new buffer anyway
        out: list[Request] = []
        while n + len(out) < max(places, 1) and (r := requests.peek()) is not None:
            wider = max(width, len(r.ids))
            if (n or out) and (n + len(out) + 1) * (wider + room) > budget:
                break
            if columns is not None and wider + room > columns:
                break
            out.append(requests.take())
            width = wider
        return out

    def _join(self, batch: SlotCache, joining: list[Request], max_rows: int, budget: int) -> torch.Tensor:
        """Prefill the joining rows (longest first) in groups of near-equal length, so that little
        padding is computed, into the batch's cache; return their last positions' logits."""
        joining.sort(key=lambda r: -len(r.ids))
        lengths = [len(r.ids) for r in joining]
        n, width, room = batch.n, max(batch.width, lengths[0]), self.settings.max_new_tokens
        logits = None
        for a, b in prefill_groups(lengths):
            ids, group_mask = left_pad([r.ids for r in joining[a:b]], self.pad_id)
            ids, group_mask = ids.to(self.device), group_mask.to(self.device)
            self.padded_prompt_tokens += ids.numel()
            group = DynamicCache(config=self.model.config)
            out = self._forward(ids, group_mask, (group_mask.cumsum(-1) - 1).clamp(min=0), group)
            if logits is None:
                logits = out.new_empty((len(joining), out.shape[-1]))
                batch.reserve(n + len(joining), width, room, [g.keys for g in group.layers], budget, max_rows)
            logits[a:b] = out
            batch.add(n + a, lengths[a:b], [(g.keys, g.values) for g in group.layers])
        return logits

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        start = time.perf_counter()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kwarg: cache},
        )
        logits = out.logits[:, -1, :].float()
        if logits.is_cuda:
            torch.cuda.synchronize()
        self.forward_seconds += time.perf_counter() - start
        return logits

    def _choose(self, logits: torch.Tensor, generators: list) -> torch.Tensor:
        if not self.settings.do_sample:
            return logits.argmax(-1)
        scores = self.warpers(None, logits)
        probs = torch.softmax(scores, dim=-1)
        return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


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
        """The running batch's limits for this job on this device: rows at once and their token budget."""
        return cls(engine, batching.max_batch_size, batching.max_batch_tokens, max_new_tokens)

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


def error_completion(prompt: list[int], message: str) -> Completion:
    return _error_row(message, len(prompt))


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
