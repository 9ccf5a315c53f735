"""The benchmark model: a random-weight Llama built locally (never downloaded), NF4-round-tripped, with a random LoRA adapter, its </s> and stop-word rows tilted so that answers end at very different lengths."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from batch.bench.measuring import dist_line, quantiles, release_memory
from batch.bench.prompts import make_prompts
from batch.bench.settings import BUILD_VERSION, DTYPES, LORA_TARGETS, BenchConfig

# --- the benchmark model -------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _model_key(cfg: BenchConfig, tokenizer) -> dict:
    m = dataclasses.asdict(cfg.model)
    m.pop("dir")
    key = {
        "version": BUILD_VERSION, "model": m, "seed": cfg.seed, "device": cfg.device, "dtype": _build_dtype_name(cfg),
        "max_new_tokens": cfg.max_new_tokens, "stop": cfg.stop, "tokenizer_vocab": len(tokenizer),
        "prompts": [cfg.prompt_median, cfg.prompt_sigma, cfg.prompt_min, cfg.prompt_max],
    }
    if cfg.shared_instruction:  # (the tuning prompts have it; absent otherwise: built models stay valid)
        key["shared_instruction"] = cfg.shared_instruction
    return key


def _build_dtype_name(cfg: BenchConfig) -> str:
    # saved in float32 on the CPU (what vLLM and the float32 variant load); in the compute dtype on a GPU
    return "float32" if cfg.device == "cpu" else cfg.compute_dtype


def ensure_model(cfg: BenchConfig, tokenizer) -> dict:
    """The benchmark model's directories (base, adapter) and build notes; built when missing or stale."""
    root = Path(cfg.model.dir)
    key = _model_key(cfg, tokenizer)
    meta_path = root / "meta.json"
    if meta_path.exists():
        with contextlib.suppress(ValueError, OSError):
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key and (root / "base" / "config.json").exists() and (root / "adapter").exists():
                meta["built_now"] = False
                return meta
    shutil.rmtree(root, ignore_errors=True)
    meta = build_model(cfg, tokenizer, root)
    meta["key"] = key
    root.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    meta["built_now"] = True
    return meta


def build_model(cfg: BenchConfig, tokenizer, root: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    m = cfg.model
    device, dtype = torch.device(cfg.device), DTYPES[_build_dtype_name(cfg)]
    vocab = max(len(tokenizer), m.vocab_size)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():  # explicit init, the same under any transformers version
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
        # rows past the tokenizer's vocabulary: logit 0, below the best of ~len(tokenizer) random
        # logits at every step, so they are never generated (they are never in prompts either)
        model.lm_head.weight[len(tokenizer) :] = 0
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    if m.nf4_round_trip:
        nf4_round_trip(model)
    print(f"bench: built a random Llama ({_params(model) / 1e6:.1f}M parameters, vocab {vocab}) on {cfg.device} "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    lora = LoraConfig(task_type="CAUSAL_LM", r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.empty(p.shape, device=device, dtype=torch.float32).normal_(0.0, m.lora_b_std, generator=gen))
    adapter_dir = root / "adapter"
    peft_model.save_pretrained(adapter_dir, safe_serialization=True, save_embedding_layers=False)
    (adapter_dir / "README.md").unlink(missing_ok=True)

    # tilt </s> and a stop-word token toward the mean final hidden state (greedy runs with the adapter on)
    tune = make_prompts(cfg, tokenizer, m.tune_prompts, cfg.seed + 7)
    eos_id, stop_id = tokenizer.eos_token_id, stop_token(tokenizer, cfg.stop)
    banned = [eos_id] + ([stop_id] if stop_id is not None else [])
    print(f"bench: tuning where answers end: greedy runs of {len(tune)} prompts x {cfg.max_new_tokens} tokens, with and without the adapter",
          file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    # with and without the adapter: it moves the hidden states, and both kinds of variant should spread
    hidden, best = record_greedy_runs(peft_model.get_base_model(), tokenizer, tune, cfg.max_new_tokens, banned, device)
    with peft_model.disable_adapter():
        hidden_base, best_base = record_greedy_runs(peft_model.get_base_model(), tokenizer, tune, cfg.max_new_tokens, banned, device)
    hidden, best = torch.cat([hidden, hidden_base]), torch.cat([best, best_base])
    model = peft_model.unload()  # the base model again, without LoRA layers
    tilt = tilt_output_rows(model, hidden, best, eos_id, stop_id, m.mean_length * cfg.max_new_tokens, groups=2)
    tilt["tune_seconds"] = round(time.perf_counter() - t1, 2)
    print(f"bench: tilted </s>{' and ' + repr(tokenizer.convert_ids_to_tokens(stop_id)) if stop_id is not None else ''} "
          f"by {tilt['alpha']:.4f} (and {tilt['beta']:+.4f} along the adapter's shift); predicted completion lengths on {len(tune)} prompts, "
          f"with and without the adapter: {dist_line(tilt['predicted'], cfg.max_new_tokens)}; means {tilt['predicted']['mean_with_adapter']:.1f} "
          f"with, {tilt['predicted']['mean_without']:.1f} without",
          file=sys.stderr, flush=True)

    base_dir = root / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    for f in Path(m.tokenizer).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens")) or f.suffix == ".model":
            shutil.copy(f, base_dir / f.name)
    info = {
        "base": str(base_dir), "adapter": str(adapter_dir), "parameters": _params(model), "vocab_size": vocab,
        "dims": {"hidden": m.hidden_size, "layers": m.num_layers, "heads": m.num_heads, "intermediate": m.intermediate_size},
        "tilt": tilt, "build_seconds": round(time.perf_counter() - t0, 2),
    }
    del model, peft_model
    release_memory(cfg.device)
    return info


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def nf4_round_trip(model) -> None:
    """Decoder Linear weights := dequantize(quantize_nf4(w)), blocksize 64, double quant: the values
    an NF4 load computes with, so every variant (and vLLM in float32) runs the same function."""
    import bitsandbytes.functional as bnbf

    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.data
            q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            module.weight.data = bnbf.dequantize_4bit(q, state).to(w.dtype).reshape(w.shape)


def stop_token(tokenizer, stop: list[str]) -> int | None:
    """A single token that spells a stop word (e.g. '▁###' for '###'), to tilt like </s>."""
    for word in stop:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and word in tokenizer.decode(ids) and ids[0] not in tokenizer.all_special_ids:
            return ids[0]
    return None


@torch.inference_mode()
def record_greedy_runs(model, tokenizer, prompts: list[str], max_new: int, banned: list[int], device, batch: int = 16):
    """Greedy runs with the `banned` tokens never chosen: each step's final hidden state and best
    other logit. Greedy paths do not depend on the banned rows' weights until one of them wins, so
    these decide exactly where any tilt of those rows would end each row."""
    from transformers import DynamicCache

    hidden, best = [], []
    pad = tokenizer.unk_token_id or 0
    encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    for s in range(0, len(encoded), batch):
        rows = encoded[s : s + batch]
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        h = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).last_hidden_state[:, -1]
        next_pos = mask.sum(-1, keepdim=True)
        hs, bs = [], []
        for t in range(max_new):
            logits = model.lm_head(h).float()
            hs.append(h.float().cpu())
            logits[:, banned] = float("-inf")
            top = logits.max(-1)
            bs.append(top.values.cpu())
            if t == max_new - 1:
                break
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            h = model.model(input_ids=top.indices[:, None], attention_mask=mask, position_ids=next_pos, cache=cache, use_cache=True).last_hidden_state[:, -1]
            next_pos = next_pos + 1
        hidden.append(torch.stack(hs, 1))
        best.append(torch.stack(bs, 1))
    return torch.cat(hidden), torch.cat(best)


@torch.no_grad()
def tilt_output_rows(model, hidden: torch.Tensor, best: torch.Tensor, eos_id: int, stop_id: int | None, mean_target: float,
                     groups: int = 1) -> dict:
    """Set lm_head[eos] (and lm_head[stop token]) := alpha * u + beta * d + its random row, u = the
    unit mean final hidden state, with alpha bisected so that the mean completion length hits the
    target (the mean, not the median: the lengths come out bimodal -- loops that never stop, rows
    that stop at once -- and a median sitting between the two modes jumps with a few prompts).

    With `groups=2` the rows are two halves, the runs with the adapter and those without: d is the
    unit difference of their mean hidden states (orthogonal to u) and beta is bisected so that both
    halves end at the same mean length. Otherwise the adapter moves the hidden states and the
    variants with and without it answer with different lengths, so their tok/s would compare two
    workloads (prefill spread over fewer or more generated tokens), not two ways of computing.

    A bisection ends where a row's logit ties its best other logit, so a rounding of the last bit
    (another CPU's matmul) would move that row's end; alpha is then moved to the middle of the range
    where every row ends as predicted, and `margin` (logit units) is how far any tilted logit stays
    from the best other one: the lengths hold wherever the arithmetic errs by less."""
    w = model.lm_head.weight
    u = hidden.reshape(-1, hidden.shape[-1]).mean(0)
    u = u / u.norm()
    half = len(hidden) // 2
    d = torch.zeros_like(u)
    if groups == 2:
        diff = hidden[:half].reshape(-1, hidden.shape[-1]).mean(0) - hidden[half:].reshape(-1, hidden.shape[-1]).mean(0)
        d = diff - (diff @ u) * u
        d = d / d.norm()
    # the tuning in float64: every CPU then takes the same bisection steps to the same plateau (in float32
    # a CPU's own rounding could end it on another, as narrow as 3e-8 logits: the 2-core Xeon, 2026-12-06)
    hidden, best = hidden.double(), best.double()
    along, across = hidden @ u.double(), hidden @ d.double()  # [rows, steps]
    ids = [eos_id] + ([stop_id] if stop_id is not None else [])
    own = torch.stack([hidden @ w[i].double().cpu() for i in ids], -1)  # the rows' random parts

    def lengths(alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
        logits = (alpha * along + beta * across)[..., None] + own  # [rows, steps, len(ids)]
        wins = logits.max(-1).values > best
        first = torch.where(wins.any(1), wins.float().argmax(1) + 1, torch.full((len(hidden),), hidden.shape[1]))
        which = logits.argmax(-1).gather(1, (first - 1)[:, None]).squeeze(1)
        return first.numpy(), np.where(wins.any(1).numpy(), which.numpy(), -1)

    def alpha_for(beta: float) -> float:
        low, high = 0.0, 1.0
        while lengths(high, beta)[0].mean() > mean_target and high < 1e4:
            high *= 2
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if lengths(mid, beta)[0].mean() > mean_target else (low, mid)
        return high

    def gap(beta: float) -> float:  # the adapter runs' mean length minus the others' (falls as beta grows)
        n = lengths(alpha_for(beta), beta)[0]
        return n[:half].mean() - n[half:].mean()

    beta = 0.0
    if groups == 2:
        low, high = -1.0, 1.0
        while gap(low) < 0 and low > -1e3:
            low *= 2
        while gap(high) > 0 and high < 1e3:
            high *= 2
        for _ in range(30):
            beta = (low + high) / 2
            low, high = (beta, high) if gap(beta) > 0 else (low, beta)
        beta = min((low, high), key=lambda b: abs(gap(b)))
    alpha, margin = _mid_plateau(alpha_for(beta), beta, along, across, own, best)
    for i in ids:
        w[i] = (alpha * u.to(w.device) + beta * d.to(w.device) + w[i].float()).to(w.dtype)
    n, which = lengths(alpha, beta)
    predicted = quantiles(n.tolist())
    predicted.update(
        at_max=float((n >= hidden.shape[1]).mean()), within_4=float((n <= 4).mean()),
        eos=int((which == 0).sum()), stop=int((which == 1).sum()), length=int((which == -1).sum()),
    )
    if groups == 2:
        predicted.update(mean_with_adapter=float(n[:half].mean()), mean_without=float(n[half:].mean()))
    return {"alpha": alpha, "beta": beta, "margin": margin, "cos_mean_hidden": float((along / hidden.norm(dim=-1)).mean()), "predicted": predicted}


def _mid_plateau(alpha: float, beta: float, along, across, own, best) -> tuple[float, float]:
    """The middle of the range of alphas around `alpha` in which no tilted logit crosses the best
    other logit (so every row ends where it does at `alpha`), and the distance of the tilted logits
    from the best others there (the smallest, in logit units)."""
    along, across, own, best = (t.double() for t in (along, across, own, best))
    rest = (beta * across)[..., None] + own - best[..., None]  # logit - best = alpha * along + rest
    crossing = (-rest / along[..., None])[along.abs() > 0].flatten()  # the alphas where one crosses
    below, above = crossing[crossing <= alpha], crossing[crossing > alpha]
    low = below.max().item() if len(below) else alpha - 1.0
    high = above.min().item() if len(above) else alpha + 1.0
    alpha = (low + high) / 2
    margin = (alpha * along[..., None] + rest).abs().min().item()
    return alpha, margin
