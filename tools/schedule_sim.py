"""The engine's scheduling without a GPU: decode steps, rows in flight and prefills for a workload.

    python tools/schedule_sim.py [--prompts 1024] [--rows 512] [--tokens 212992] [--shared 400 --median 60] [--no-share] [--slots | --padded] [--copies]

Runs the real Engine.stream and its KV cache (joining, prefill groups, buffers made, rows leaving) on
the CPU with the tiny model's prefill, but a stand-in decode step (tests/test_engine_parts.EndsAt) whose rows end at answer lengths
drawn like those of the H200 bench run (jobs/bench-gpu.yaml's tilted 7B model: median 19, mean ~30,
a few at 128), and prompts drawn like the bench's (lognormal, median 120, max 1,000; random token ids,
after a head of `--shared` tokens that every prompt starts with: the annotation shape). The cache is
a GPU's where decode attention reads each row's own keys: each row in its own extent of one buffer
(ExtentCache) and prefilled packed (the joining rows' tokens in one sequence, none padded; `--padded`:
in groups of near-equal length, padded), or with `--slots` every slot as wide as the widest running
row and padded prefill (SlotCache, the CPU's and a GPU's without the kernel). It prints the decode steps, the rows in flight on average, the
prefill forwards, the keys a decode step's attention reads (each row's own, a prefix every row
shares once where the step reads it once; with --slots also sdpa with the mask over the whole
buffer), the prompt tokens shared (batch.prefix) and prefilled, the steps that read a prefix once, and the
buffers made: the figures the scheduling decides, not the speed of any device.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch import kv_cache  # noqa: E402
from batch.config import GenerationSettings  # noqa: E402
from batch.decode_attention import reference_kernel  # noqa: E402
from batch.engine import Engine, Request, SafeGenerator  # noqa: E402
from batch.loading import load_model  # noqa: E402
from batch.plan import plan_batches  # noqa: E402
from tests.test_engine_parts import EndsAt  # noqa: E402
from tests.test_exactness import model_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--tokens", type=int, default=212_992)  # the H200's budget for the 7B model (batch/memory.py)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--median", type=int, default=120)  # prompt tokens (after the shared head)
    p.add_argument("--shared", type=int, default=0)  # tokens of a head every prompt starts with
    p.add_argument("--no-share", action="store_true")  # batching.share_prefix: false
    p.add_argument("--slots", action="store_true")  # every row as wide as the widest (SlotCache), not its own extent (ExtentCache)
    p.add_argument("--padded", action="store_true")  # extents filled by prefill groups of near-equal length, padded (not packed)
    p.add_argument("--copies", action="store_true")  # decode steps over extents read every row's copy of a shared prefix (not it once)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    prompt_lengths = args.shared + np.clip(np.round(rng.lognormal(math.log(args.median), 0.9, args.prompts)), 8, 1000).astype(int)
    answers = np.clip(np.round(rng.lognormal(math.log(19), 1.1, args.prompts)), 1, args.max_new).astype(int)
    model, tokenizer = load_model(model_config("float32"))
    engine = Engine(model, tokenizer, GenerationSettings(max_new_tokens=args.max_new, do_sample=False, stop=[]), fixed_shapes=True,
                    share_prefix=not args.no_share, rows_kernel=reference_kernel, extents=not args.slots,
                    packed_prefill=not (args.slots or args.padded), read_once=False if args.copies else None)
    engine.step = EndsAt(answers.tolist())  # row i (seed i) ends after answers[i] tokens
    cache_class = kv_cache.SlotCache if args.slots else kv_cache.ExtentCache
    buffers = []
    reserve = cache_class.reserve

    def counted(cache, *a, **k):
        before = cache.buffer
        reserve(cache, *a, **k)
        if cache.buffer != before:
            buffers.append((engine.steps, cache.slots, cache.columns))

    cache_class.reserve = counted
    keys_read = {"whole buffer": 0, "own keys": 0}  # keys the decode steps' attention reads, all rows together
    held = [0]  # the cache tokens the running rows of each decode step may take (their prompts + max_new_tokens)
    step = cache_class.step

    def count(cache, rows, columns, shared=0):
        keys_read["whole buffer"] += rows * columns  # sdpa with the mask: every column read, for every row computed
        # batch.decode_attention: each row's own keys (a shared prefix's columns once, where the step reads them once)
        keys_read["own keys"] += shared + sum(p + 1 - shared for p in cache.pos[: cache.n]) + (rows - cache.n)
        held[0] += sum(cache.need[: cache.n])

    def reading(cache, rows, whole):
        inputs = step(cache, rows, whole)
        count(cache, rows, inputs.columns, inputs.shared.columns if inputs.shared is not None else 0)
        return inputs

    cache_class.step = reading
    packed_forward = engine._packed_forward

    def mixed(batch, prompts, shared, starts, decode=0):  # a decode step taken in a packed prefill's forward
        if decode:
            count(batch, decode, 0)
        return packed_forward(batch, prompts, shared, starts, decode)

    engine._packed_forward = mixed
    order = [i for batch in plan_batches(prompt_lengths.tolist(), args.max_new, 32, 65536) for i in batch]
    head = [1] + rng.integers(5, len(tokenizer), args.shared).tolist()
    requests = (Request(i, head + rng.integers(5, len(tokenizer), int(prompt_lengths[i]) - len(head)).tolist(), i) for i in order)
    done = list(SafeGenerator(engine, args.rows, args.tokens, args.max_new).stream(requests))
    assert len(done) == args.prompts and not any(c.error for _, c in done)
    print(f"{args.prompts} prompts ({prompt_lengths.sum()} tokens), answers: median {np.median(answers):.0f}, mean {answers.mean():.1f}, "
          f"{(answers == args.max_new).mean():.1%} at {args.max_new}; running batch: {args.rows} rows within {args.tokens} tokens")
    print(f"decode steps {engine.steps} ({engine.mixed_steps} in a packed prefill's forward, {engine.steps - engine.mixed_steps} alone), rows in flight {engine.row_steps / engine.steps:.1f} (their needs {held[0] / engine.steps / args.tokens:.0%} "
          f"of the token budget), prefill forwards {engine.prefills} "
          f"({engine.padded_prompt_tokens / engine.prefills:.0f} positions each); prompt tokens shared {engine.shared_prompt_tokens}, "
          f"prefilled {engine.prefilled_prompt_tokens} ({engine.prefilled_prompt_tokens / prompt_lengths.sum():.1%}); "
          f"decode steps that read a shared prefix once {engine.shared_reads}")
    per_step = {k: v / engine.steps for k, v in keys_read.items() if args.slots or k == "own keys"}
    print("keys read by a decode step's attention, on average: " + ", ".join(f"{k} {v:,.0f}" for k, v in per_step.items())
          + (f" ({per_step['whole buffer'] / per_step['own keys']:.1f}x)" if args.slots else "")
          + "; for the 7B model in bf16 (0.5 MiB a key and value, 32 layers): "
          + ", ".join(f"{k} {v * 2**19 / 2**30:.1f} GiB" for k, v in per_step.items()))
    print("buffers made (at step: slots x columns): " + ", ".join(f"{s}: {r} x {c}" for s, r, c in buffers))


if __name__ == "__main__":
    main()
