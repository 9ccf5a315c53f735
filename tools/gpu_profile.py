"""Where a GPU's time goes in the engine: a short stream under torch.profiler, tables of kernels.

    python tools/gpu_profile.py [--model /tmp/komt-bench-7b] [--prompts 128] [--max-new 16] [--graphs]

Loads the bench model that `komt-batch bench jobs/bench-gpu.yaml` built (NF4 + LoRA, bf16 compute),
dequantizes it (model.weights: dequantized), streams `--prompts` random prompts (lognormal lengths,
median 120) through Engine.stream, and prints: the prefill / decode / capture regions' CPU and CUDA
time (record_function around the engine's own timed regions), and the kernels with the most CUDA
time. Without `--graphs` the decode steps run eagerly at fixed shapes (every kernel visible).

With `--read-once-ab N`, it only streams N prompts of the annotation shape (a 400-token head every
prompt shares, then ~60 of its own; 32 new tokens) twice, steps replayed as graphs over extents: the
shared prefix read once (batch.decode_attention.rows_attention), then every row's copy of it read,
and prints each one's milliseconds per replayed decode step.

With `--prefill-rate`, it first times prefill forwards of fixed shapes (rows x length, padded
batches); with `--engine-rate`, the engine's own prefill of 32k prompt tokens in rows of 128 and of
512 (packed into forwards of up to 8,192 tokens where the kernel over each row's own keys is used).

With `--attention-ab N`, it then streams the first N prompts (`--ab-max-new` new tokens) twice more,
decode steps replayed as CUDA graphs, without the profiler: attention over each row's own keys
(batch.decode_attention, where its check passes) and sdpa with the mask over the whole buffer, and
prints each one's milliseconds per replayed decode step.
"""

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch.config import GenerationSettings, ModelConfig  # noqa: E402
from batch.decode_attention import reference_kernel  # noqa: E402
from batch.engine import PREFILL_GROUP_TOKENS, Engine, Request, SafeGenerator  # noqa: E402
from batch.loading import dequantize_model, load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="/tmp/komt-bench-7b")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--graphs", action="store_true")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--device", default="cuda")  # (cpu: a check of this script, e.g. --model models/tiny-komt)
    p.add_argument("--attention-ab", type=int, default=0)
    p.add_argument("--ab-max-new", type=int, default=64)
    p.add_argument("--prefill-rate", action="store_true", help="time prefill forwards of fixed shapes first (GPU rate vs host time)")
    p.add_argument("--engine-rate", action="store_true", help="time the engine's own prefill (packed where it can be) first")
    p.add_argument("--rate-only", action="store_true", help="with --prefill-rate or --engine-rate: only that (no profiled stream)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the dequantized weights (model.merge_adapter)")
    p.add_argument("--read-once-ab", type=int, default=0, help="only this: N annotation-shaped prompts, a shared prefix read once vs every copy")
    p.add_argument("--reference-kernel", action="store_true",
                   help="attention over each row's own keys by batch.decode_attention.reference_kernel: the GPU's paths (extents, packed prefill, "
                        "a prefix read once) on the CPU, a check of this script")
    args = p.parse_args()
    cfg = ModelConfig(base=f"{args.model}/base", adapter=f"{args.model}/adapter", quantization="nf4", compute_dtype="bfloat16",
                      device_map=args.device, weights="dequantized" if args.merge else "nf4",
                      merge_adapter=args.merge)
    model, tokenizer = load_model(cfg, "<profile>")
    if not args.merge:
        dequantize_model(model, torch.bfloat16)
    settings = GenerationSettings(max_new_tokens=args.max_new, do_sample=False, stop=[])
    if args.read_once_ab:
        read_once_ab(model, tokenizer, args)
        return
    engine = make_engine(model, tokenizer, settings, args, cuda_graphs=args.graphs, fixed_shapes=True)
    if args.prefill_rate:
        prefill_rate(engine, len(tokenizer), args.merge)
    if args.engine_rate:
        engine_prefill_rate(model, tokenizer, args)
    if args.rate_only and (args.prefill_rate or args.engine_rate):
        return
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(math.log(120), 0.9, args.prompts)), 8, 1000).astype(int)
    requests = [Request(i, [1] + rng.integers(3, len(tokenizer), n - 1).tolist(), i) for i, n in enumerate(sorted(lengths, reverse=True))]

    timed = None

    @contextlib.contextmanager
    def labelled(kind):
        with torch.profiler.record_function(f"engine:{kind}"), timed(kind) as tag:
            yield tag

    list(SafeGenerator(engine, args.rows, args.tokens, args.max_new).stream(requests[:8]))  # lazy initialisation, outside the profile
    engine = make_engine(model, tokenizer, settings, args, cuda_graphs=args.graphs, fixed_shapes=True)  # (counters from 0)
    timed = engine._timed
    engine._timed = labelled
    cuda = args.device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        list(SafeGenerator(engine, args.rows, args.tokens, args.max_new).stream(requests))
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"profile: {args.prompts} prompts ({int(lengths.sum())} tokens), {args.max_new} new tokens, graphs {args.graphs}; "
          f"engine: {engine.steps} decode steps, {engine.row_steps / max(engine.steps, 1):.1f} rows in flight, "
          f"{engine.prefills} prefills, prefill {engine.prefill_seconds:.2f}s, decode {engine.decode_seconds:.2f}s")
    regions = [e for e in events if e.key.startswith("engine:")]
    for e in regions:
        print(f"  {e.key:<16} calls {e.count:>5}  CPU total {e.cpu_time_total / 1e3:9.1f} ms  CUDA total {e.device_time_total / 1e3:9.1f} ms")
    print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=30, max_name_column_width=70), flush=True)
    if cuda:  # where the host's time goes
        print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70), flush=True)
    if args.attention_ab:
        attention_ab(model, tokenizer, requests[: args.attention_ab], args)


@torch.inference_mode()
def prefill_rate(engine: Engine, vocab: int, merged: bool = False, shapes=((8, 128), (32, 128), (64, 128), (128, 128), (8, 1000))) -> None:
    """Prefill forwards of fixed shapes (rows x length, no padding), as the engine runs them (a boolean
    mask, position ids, a fresh cache): the device's prompt tokens/s and the host's milliseconds to
    launch one forward. Then the same without a mask (causal sdpa: flash), to see what the mask costs."""
    from transformers import DynamicCache

    from batch.prefix import prefill_mask

    cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:  # where a prefill forward with left padding first makes the host wait for the GPU, if it does
        ids = torch.randint(3, vocab, (4, 64), device=engine.device)
        mask = torch.ones_like(ids)
        mask[1:, :8] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        torch.cuda.set_sync_debug_mode("error")
        try:
            engine._logits(ids, prefill_mask(mask, 0, engine.mask_dtype), positions, DynamicCache(config=engine.model.config))
            print("prefill rate: a padded prefill forward made no host sync")
        except Exception as e:  # noqa: BLE001 -- (a sync raises RuntimeError; anything else is said too)
            import traceback

            where = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)[-4:]]
            print(f"prefill rate: a padded prefill forward syncs the host ({type(e).__name__}: {str(e)[:80]}) at: {' <- '.join(reversed(where))}")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for rows, length in shapes:
        ids = torch.randint(3, vocab, (rows, length), device=engine.device)
        positions = torch.arange(length, device=engine.device).expand(rows, length)
        for masked in (True, False):
            mask = prefill_mask(torch.ones(rows, length, dtype=torch.long, device=engine.device), 0, engine.mask_dtype) if masked else None
            run = lambda: engine._logits(ids, mask, positions, DynamicCache(config=engine.model.config))  # noqa: E731
            run(), run(), sync()
            host, start = 0.0, time.perf_counter()
            for _ in range(5):
                t = time.perf_counter()
                run()
                host += time.perf_counter() - t
            sync()
            wall = time.perf_counter() - start
            print(f"prefill rate{' (merged)' if merged else ''}: {rows:>4} x {length:<5} {'mask' if masked else 'no mask (causal)'}: "
                  f"{5 * rows * length / wall:>9,.0f} prompt tok/s, {1000 * wall / 5:7.1f} ms per forward, "
                  f"host {1000 * host / 5:6.1f} ms to launch it", flush=True)


@torch.inference_mode()
def engine_prefill_rate(model, tokenizer, args, lengths=(128, 512), tokens: int = 4 * 8192) -> None:
    """The engine's own prefill, as a stream runs it: `tokens` prompt tokens in rows of one length,
    each row's one new token chosen in its prefill (max_new_tokens 1), so that the stream is its joins'
    forwards (packed where the kernel over each row's own keys is used, else padded groups). Its
    prompt tokens a second of those forwards (the rows that ride along in a join's later forwards are in
    their time), and over the stream's wall time."""
    settings = GenerationSettings(max_new_tokens=1, do_sample=False, stop=[])
    rng = np.random.default_rng(2)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    for length in lengths:
        requests = [Request(i, [1] + rng.integers(3, len(tokenizer), length - 1).tolist(), i) for i in range(max(tokens // length, 1))]
        warm = requests[: max(PREFILL_GROUP_TOKENS // length, 1)]  # (a forward of the timed shape first)
        list(SafeGenerator(make_engine(model, tokenizer, settings, args), args.rows, args.tokens, 1).stream(warm))
        engine = make_engine(model, tokenizer, settings, args)
        sync()
        start = time.perf_counter()
        out = list(SafeGenerator(engine, args.rows, args.tokens, 1).stream(requests))
        sync()
        wall = time.perf_counter() - start
        print(f"prefill rate{' (merged)' if args.merge else ''}: engine, {len(out)} rows x {length}: "
              f"{engine.prefilled_prompt_tokens / max(engine.prefill_seconds, 1e-9):>9,.0f} prompt tok/s in its {engine.prefills} "
              f"forwards ({'packed' if engine.packed_prefill else 'padded groups'}, {engine.padded_prompt_tokens / max(engine.prefills, 1):,.0f} "
              f"positions each), {engine.prefilled_prompt_tokens / wall:,.0f} over the wall ({wall:.2f}s)", flush=True)


def make_engine(model, tokenizer, settings: GenerationSettings, args, **options) -> Engine:
    """An Engine; with --reference-kernel, its attention over each row's own keys is the reference kernel."""
    return Engine(model, tokenizer, settings, rows_kernel=reference_kernel if args.reference_kernel else None, **options)


def attention_ab(model, tokenizer, requests, args) -> None:
    """The same stream, steps replayed as graphs: each row's own keys from a cache of extents (the
    default), from slots as wide as the widest row, then sdpa over the whole buffer of slots."""
    settings = GenerationSettings(max_new_tokens=args.ab_max_new, do_sample=False, stop=[])
    for label in ("own keys", "own keys, slots", "sdpa mask"):
        engine = make_engine(model, tokenizer, settings, args, fixed_shapes=True, extents=None if label == "own keys" else False)
        if label == "sdpa mask":
            engine.step.rows_kernel = None
        elif engine.step.rows_kernel is None:
            print("attention A/B: the kernel over each row's own keys is not used here (see its line above)")
            return
        out = list(SafeGenerator(engine, args.rows, args.tokens, args.ab_max_new).stream(requests))
        print(f"attention A/B: {label:<15}: {ab_figures(engine, out)}", flush=True)


def ab_figures(engine: Engine, out: list, note: str = "") -> str:
    """One side of an A/B, from its engine's counters: rows, steps, ms a replayed step, rows in flight,
    captures, prefill time."""
    return (f"{len(out)} rows, {engine.steps} decode steps ({note}{engine.decode_steps} replayed, "
            f"{1000 * engine.decode_seconds / max(engine.decode_steps, 1):.2f} ms each), {engine.row_steps / max(engine.steps, 1):.1f} "
            f"rows in flight, {engine.step.captures} captures ({engine.capture_seconds:.1f}s), prefill {engine.prefill_seconds:.2f}s")


def read_once_ab(model, tokenizer, args, shared: int = 400, median: int = 60, max_new: int = 32) -> None:
    """The annotation shape (a `shared`-token head every prompt starts with, then its own tokens,
    lognormal around `median`), decode steps replayed as graphs over extents: a prefix every row
    shares read once (the default, where the kernel's check passes), then every row's copy read."""
    rng = np.random.default_rng(1)
    head = [1] + rng.integers(3, len(tokenizer), shared - 1).tolist()
    own = np.clip(np.round(rng.lognormal(math.log(median), 0.6, args.read_once_ab)), 8, 600).astype(int)
    requests = [Request(i, head + rng.integers(3, len(tokenizer), n).tolist(), i) for i, n in enumerate(sorted(own, reverse=True))]
    settings = GenerationSettings(max_new_tokens=max_new, do_sample=False, stop=[])
    for label, read_once in (("read once", None), ("every copy", False)):
        engine = make_engine(model, tokenizer, settings, args, fixed_shapes=True, read_once=read_once)
        out = list(SafeGenerator(engine, args.rows, args.tokens, max_new).stream(requests))
        print(f"read-once A/B: {label:<10}: {ab_figures(engine, out, f'{engine.shared_reads} reading the prefix once; ')}", flush=True)


if __name__ == "__main__":
    main()
