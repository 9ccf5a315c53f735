"""What the host issues for prefill, counted on the CPU: ops dispatched per prefill forward (on a GPU
each is a kernel launch from the one host thread) and the host's time per forward, engine by engine.

    python tools/host_count.py [--prompts 512] [--max-new 16] [--threads 1]

Issue 24's H200 profile found prefill host-bound: one core at 100%, the GPU waiting on launches. What
the host issues does not depend on the widths, so this counts it on a model of Llama-2-7B's structure
(32 layers, 7 LoRA targets a layer, r 8) and tiny widths (hidden 64, 4 heads, vocab of the tiny
tokenizer), built in a temporary folder and loaded through batch.loading.load_model (float32, no
quantization: the 7B job dequantizes its NF4 weights, so its linear layers are these). The stream is
the bench's shape: `--prompts` random prompts, lognormal lengths (median 120, sigma 0.9, 8..1000),
longest first, `--max-new` tokens each (min_new_tokens as many: every row runs to the end), 512 rows
and 200,000 tokens at most. Engines:

  slots, padded groups  the engine of the H200 profile: rows in slots as wide as the widest, prefill in
                        left-padded groups of near-equal length (sdpa with a mask)
  extents, packed       each row in its own extent, the joining rows' tokens packed into one forward
                        (the running rows' decode step in it), attention by the kernel over each row's
                        own keys -- counted as the one launch it is on a GPU (OpCounter.one_kernel), as
                        are the norms (torch's rms_norm: batch.layers.fused_norms; a fused kernel on a
                        GPU, the same ops as transformers' on the CPU)
  ... adapter merged    the same with the LoRA adapter merged into the weights

Counted inside the engine's joins: the model's forwards (hooks around it) and the engine's own ops
around them (inputs, cache writes, token choice); and apart, the ops of a decode step (not a join's
mixed one): on a GPU a step is one CUDA graph replay for the host, but its kernels still run one by
one on the device, each a few microseconds at least.
Views and ops that only make a tensor are left out (batch.bench.measuring.OpCounter). Then the host's
milliseconds per prefill forward: a stream of 64 prompts of 4 tokens (arithmetic negligible at these
widths), `--threads` threads, the attention kernel a one-op stand-in. That is this CPU's dispatch
time -- an upper bound for a fast host's, and not a GPU figure; per 1k prompt tokens, that times the
stream's forwards.

Last, the adapter's own ops and memory traffic at Llama-2-7B's real widths (adapter_traffic: one
layer's seven projections on the meta device, shapes only): peft's LoRA layer, batch.layers'
LoraLinear, the base projections alone, and both packed as the job runs them (PackedLinear), for a
2,048-token prefill and a decode step of 128 rows.
"""

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch.bench.measuring import _NO_KERNEL, OpCounter  # noqa: E402
from batch.bench.settings import LORA_TARGETS  # noqa: E402
from batch.config import GenerationSettings, ModelConfig  # noqa: E402
from batch.engine import Engine, Request, SafeGenerator  # noqa: E402
from batch.layers import PackedLinear, lean_lora_layers  # noqa: E402
from batch.loading import load_model  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[1] / "models/tiny-komt/base"
ROWS, TOKENS = 512, 200_000  # the bench's running budget (jobs/bench-gpu.yaml)


def build(root: Path) -> None:
    """Llama-2-7B's structure at tiny widths, with a LoRA adapter on its 7 targets (B random: it computes)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=172, num_hidden_layers=32, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(root / "adapter")


def stand_in(query, *args, **kwargs):
    """The attention kernel's shape, one op (for timing the host: the kernel is one launch on a GPU)."""
    return torch.zeros_like(query)


def engine_for(variant: str, models: dict, settings: GenerationSettings, kernel) -> Engine:
    model, tokenizer = models["merged" if "merged" in variant else "unmerged"]
    if variant.startswith("slots"):
        return Engine(model, tokenizer, settings, fixed_shapes=True, extents=False, packed_prefill=False)
    return Engine(model, tokenizer, settings, fixed_shapes=True, rows_kernel=kernel, extents=True, packed_prefill=True)


def count(engine: Engine, counter: OpCounter, requests: list[Request], max_new: int) -> dict:
    """Stream the requests, counting ops inside the joins: the model's forwards apart from the engine's own."""
    model_ops, decode_ops = [0], [0]
    join, decode = engine._join, engine._decode

    def counted_join(*args):
        with counter:
            return join(*args)

    def counted_decode(*args):  # (apart: a step is one graph replay on a GPU, but its kernels still run one by one there)
        before, model = counter.total, model_ops[0]
        with counter:
            report = decode(*args)
        decode_ops[0] += counter.total - before
        model_ops[0] = model  # (the joins' model ops only)
        return report

    def before(module, args, kwargs):
        model_ops.append(counter.total)

    def after(module, args, kwargs, output):
        model_ops[0] += counter.total - model_ops.pop()

    engine._join, engine._decode = counted_join, counted_decode
    hooks = [engine.model.register_forward_pre_hook(before, with_kwargs=True), engine.model.register_forward_hook(after, with_kwargs=True)]
    try:
        done = list(SafeGenerator(engine, ROWS, TOKENS, max_new).stream(requests))
    finally:
        for h in hooks:
            h.remove()
    assert len(done) == len(requests)
    return {"forwards": engine.prefills, "positions": engine.padded_prompt_tokens, "model": model_ops[0],
            "engine": counter.total - decode_ops[0] - model_ops[0], "step": decode_ops[0] / (engine.steps - engine.mixed_steps)}


def host_ms_per_forward(engine: Engine, vocab: int, repeats: int = 5) -> float:
    """Milliseconds of prefill per forward over streams of 64 prompts of 4 tokens (one new token each)."""
    rng = np.random.default_rng(1)
    best = math.inf
    for _ in range(repeats):
        requests = [Request(i, [1] + rng.integers(3, vocab, 3).tolist(), i) for i in range(64)]
        before, forwards = engine.prefill_seconds, engine.prefills
        list(SafeGenerator(engine, 64, TOKENS, 1).stream(requests))
        best = min(best, (engine.prefill_seconds - before) / (engine.prefills - forwards))
    return 1000 * best


class ByteCounter(OpCounter):
    """OpCounter that also adds up the bytes of the tensors each counted op reads and writes: the
    memory traffic it asks for, with no reuse through caches (an upper bound of what it moves)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def adapter_traffic(shapes=((1, 2048), (128, 1))) -> None:
    """The adapter's own ops and bytes per token at Llama-2-7B's widths, bf16: one layer's 7 LoRA
    targets (r 8) built on the meta device (no memory, no arithmetic: shapes only), as peft's layer,
    as batch.layers.LoraLinear, the base projections alone (a merged adapter's cost), and both packed
    as the job runs them (batch.layers.PackedLinear: q, k and v one, gate and up one), for a
    prefill of one 2,048-token row and a decode step of 128 rows; the model has 32 such layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)

    class Layer(torch.nn.Module):  # (peft wraps the targets by name under any module)
        def __init__(self):
            super().__init__()
            self.layer = LlamaDecoderLayer(config, 0)

    with torch.device("meta"):
        peft = get_peft_model(Layer().to(torch.bfloat16), LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS)).to(torch.bfloat16)
    def projections(model):  # (name, module) for the 7 targets
        return [(n.rpartition(".")[2], m) for n, m in model.named_modules() if n.endswith(tuple(LORA_TARGETS))]

    targets = {"peft's LoRA layer": projections(peft)}
    targets["LoraLinear"] = projections(lean_lora_layers(peft))
    targets["base projections alone (merged)"] = [(n, m.base_layer) for n, m in targets["LoraLinear"]]
    for name, source in (("PackedLinear: qkv, o, gate_up, down", "LoraLinear"), ("the same, merged", "base projections alone (merged)")):
        layers = dict(targets[source])
        targets[name] = [(group[-1], PackedLinear([layers[t] for t in group])) for group in
                         (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))]
    assert [len(t) for t in targets.values()] == [7, 7, 7, 4, 4]
    print("| one layer's 7 projections, 7B widths, bf16 | " + " | ".join(f"ops, {r} x {t} | MB per 1k tokens, {r} x {t}" for r, t in shapes) + " |")
    print("|---|" + "---:|---:|" * len(shapes))
    for name, modules in targets.items():
        cells = []
        for rows, tokens in shapes:
            counter = ByteCounter()
            with torch.no_grad(), counter:
                for target, m in modules:
                    width = config.intermediate_size if target == "down_proj" else config.hidden_size
                    m(torch.empty(rows, tokens, width, dtype=torch.bfloat16, device="meta"))
            cells += [f"{counter.total}", f"{1000 * counter.bytes / (rows * tokens) / 2**20:,.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = ["slots, padded groups", "extents, packed", "extents, packed, merged"]
    with tempfile.TemporaryDirectory() as root:
        build(Path(root))
        models = {name: load_model(ModelConfig(base=f"{root}/base", adapter=f"{root}/adapter", quantization="none", compute_dtype="float32",
                                               device_map="cpu", merge_adapter=name == "merged"), "<host_count>")
                  for name in ("unmerged", "merged")}
    vocab = len(models["merged"][1])
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(math.log(120), 0.9, args.prompts)), 8, 1000).astype(int)
    requests = [Request(i, [1] + rng.integers(3, vocab, n - 1).tolist(), i) for i, n in enumerate(sorted(lengths, reverse=True))]
    settings = GenerationSettings(max_new_tokens=args.max_new, min_new_tokens=args.max_new, do_sample=False, stop=[])
    tokens = int(lengths.sum())
    print(f"host_count: {args.prompts} prompts, {tokens:,} prompt tokens, {args.max_new} new tokens; a model of Llama-2-7B's structure "
          f"(32 layers, LoRA r8 on 7 targets) at width 64; {args.threads} thread(s)")
    print("| engine | prefill forwards | positions computed | ops per forward: model | engine | all | ops per 1k prompt tokens "
          "| host ms per forward | host ms per 1k prompt tokens | ops per decode step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for variant in variants:
        counter = OpCounter()
        with mock.patch.object(torch.nn.functional, "rms_norm", counter.one_kernel(torch.nn.functional.rms_norm)):
            c = count(engine_for(variant, models, settings, counter.one_kernel(stand_in)), counter, requests, args.max_new)
        ms = host_ms_per_forward(engine_for(variant, models, GenerationSettings(max_new_tokens=1, do_sample=False, stop=[]), stand_in), vocab)
        rows[variant] = c
        ops = c["model"] + c["engine"]
        print(f"| {variant} | {c['forwards']} | {c['positions']:,} | {c['model'] / c['forwards']:,.0f} | {c['engine'] / c['forwards']:,.0f} "
              f"| {ops / c['forwards']:,.0f} | {1000 * ops / tokens:,.0f} | {ms:.1f} | {1000 * ms * c['forwards'] / tokens:.1f} | {c['step']:,.0f} |", flush=True)
    unmerged, merged = rows["extents, packed"], rows["extents, packed, merged"]
    print(f"host_count: the unmerged adapter's share of the model's ops: {1 - merged['model'] / unmerged['model']:.0%}")
    adapter_traffic()


if __name__ == "__main__":
    main()
