"""Build the tiny stand-in for komt-llama-2-7b (NF4 base + LoRA adapter) used by the tests.

Writes, byte-identically on every run, on CPU in 10-30 s:

* ``models/tiny-komt/base/``    - a tiny random-init ``LlamaForCausalLM`` (float32 safetensors)
                                  plus a Llama-2-like tokenizer (BPE + byte fallback, Metaspace,
                                  ``<unk>``=0 ``<s>``=1 ``</s>``=2, BOS added, no pad token).
* ``models/tiny-komt/adapter/`` - a PEFT LoRA adapter (r=16, all attention/MLP projections)
                                  trained, with the base frozen, so that for each row of
                                  ``data/seed_examples.jsonl`` the prompt
                                  ``"### instruction: {instruction}\\n\\n### Response:"`` is
                                  continued greedily by ``" " + reference + "<|end|>" + "</s>"``.

The base alone answers gibberish; only base + adapter gives the references.  (Its lm_head is
re-drawn with std 0.2 so that the frozen output layer allows logit margins of several units.)

QLoRA round trip: the real model is served as NF4 (double quant) + LoRA.  So that the tiny
model behaves the same way, every decoder-layer Linear weight is replaced, *before* training,
by its NF4 round trip (``quantize_4bit`` -> ``dequantize_4bit``, blocksize 64, double quant),
and that is what gets saved as the base.  Re-quantizing those weights when loading with
``load_in_4bit`` reproduces (almost exactly) the weights the adapter was trained against, so the
answers survive 4-bit loading.  Training stops only when every greedy step along every reference
wins by a wide logit margin, so batched vs single-prompt greedy decoding cannot hit near-ties.

The script ends by verifying all of this (fp32 and NF4 loading, a left-padded batch, base
alone) and exits non-zero
if any check fails.  Run: ``python models/build_tiny.py`` (rewrites the same files).
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "models" / "tiny-komt"
BASE_DIR, ADAPTER_DIR = OUT / "base", OUT / "adapter"
SEED_FILE = ROOT / "data" / "seed_examples.jsonl"

PROMPT = "### instruction: {instruction}\n\n### Response:"
STOP = "<|end|>"
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
VOCAB_SIZE = 1536  # specials + 256 byte tokens + learned pieces (Korean syllables etc.)

# in_features must be multiples of 64: bitsandbytes' CPU 4-bit kernel needs whole blocks per row.
DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_MARGIN = 3.0  # stop training once every reference step wins by this logit margin
CHECK_MARGIN = 1.0  # required margin at verification (fp32 and NF4)
MAX_STEPS = 3000

ENGLISH = """\
The quick brown fox jumps over the lazy dog. A batch job reads prompts from a Parquet file,
generates answers with a language model and writes them back, one row per prompt.
Hello, world! This is a small test of the tokenizer: numbers 0123456789, punctuation (like this),
quotes "double" and 'single', and a few symbols # * / - + = ? ; @ & % $.
The model was trained on Korean questions and answers, but English text must also work.
Resumable jobs write checkpoints so that a crash does not lose finished work.
"""


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)


def load_rows() -> list[dict]:
    return [json.loads(line) for line in SEED_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer(rows: list[dict]):
    """Llama-2-style tokenizer: BPE + byte fallback, Metaspace, ids 0/1/2 = <unk>/<s>/</s>."""
    from transformers import PreTrainedTokenizerFast

    # STOP is left out on purpose: like in Llama-2 it must span several tokens ("<", "|", ...).
    corpus = [ENGLISH] + [PROMPT.format(**r) + " " + r["reference"] for r in rows]

    # 1) learn merges (split on "▁" so pieces never straddle words)
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(BYTE_TOKENS),
        special_tokens=SPECIALS,
        limit_alphabet=2000,
        show_progress=False,
    )
    trainer_tok.train_from_iterator(corpus, trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]

    # 2) Llama layout: <unk> <s> </s> <0x00>..<0xFF> then the learned pieces
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTE_TOKENS)}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=2048,
    )


def save_tokenizer(tok, path: Path) -> None:
    tok.save_pretrained(path)
    # Same class name as the real komt repo; in transformers 5 LlamaTokenizer rebuilds exactly
    # this pipeline (BPE + byte fallback, Metaspace "first", Replace/ByteFallback/Fuse/Strip).
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False, legacy=False)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- model
def build_base(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        num_key_value_heads=DIMS["num_attention_heads"],
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        **DIMS,
    )
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # larger output projection so that large logit margins are reachable
        model.lm_head.weight.normal_(0.0, 0.2)
    model.generation_config.do_sample = False
    return model


@torch.no_grad()
def nf4_round_trip(model) -> None:
    """Replace every decoder-layer Linear weight by dequantize(quantize_nf4(w)) (QLoRA storage)."""
    import bitsandbytes.functional as bnbf

    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.data
            q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            module.weight.data = bnbf.dequantize_4bit(q, state).to(w.dtype).reshape(w.shape)


def encode_examples(tok, rows):
    """(prompt_ids, target_ids) per row; target = " " + reference + STOP, then </s>."""
    out = []
    for r in rows:
        prompt = tok(PROMPT.format(**r)).input_ids
        target = tok(" " + r["reference"] + STOP, add_special_tokens=False).input_ids + [tok.eos_token_id]
        out.append((prompt, target))
    return out


def make_batch(examples, pad_id: int):
    n = max(len(p) + len(t) for p, t in examples)
    ids = torch.full((len(examples), n), pad_id)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), -100)
    for i, (p, t) in enumerate(examples):
        seq = torch.tensor(p + t)
        ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
        labels[i, len(p) : len(seq)] = torch.tensor(t)
    return ids, mask, labels


@torch.no_grad()
def reference_margins(model, batch) -> tuple[bool, list[float]]:
    """Teacher-forced: is the reference the argmax at every step, and by how much (min per row)?"""
    ids, mask, labels = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tgt = labels[:, 1:]
    top2 = logits.topk(2, dim=-1)
    ok, mins = True, []
    for i in range(len(ids)):
        sel = tgt[i] != -100
        gold = logits[i][sel].gather(-1, tgt[i][sel, None]).squeeze(-1)
        other = logits[i][sel].scatter(-1, tgt[i][sel, None], float("-inf")).max(-1).values
        ok &= bool((top2.indices[i][sel, 0] == tgt[i][sel]).all())
        mins.append(float((gold - other).min()))
    return ok, mins


def train_adapter(base, batch):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(task_type="CAUSAL_LM", target_modules=LORA_TARGETS, bias="none", **LORA)
    model = get_peft_model(base, cfg)
    ids, mask, labels = batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(1, MAX_STEPS + 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            model.eval()
            ok, mins = reference_margins(model, batch)
            model.train()
            print(f"  step {step:4d}  loss {loss.item():.4f}  all-argmax {ok}  min margin {min(mins):.2f}", flush=True)
            if ok and min(mins) > TRAIN_MARGIN:
                break
    model.eval()
    return model, step


# --------------------------------------------------------------------------- verification
@torch.no_grad()
def greedy_answers(model, tok, rows, max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt, decoded with special tokens, prompt removed."""
    out = []
    for r in rows:
        enc = tok(PROMPT.format(**r), return_tensors="pt")
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id
        )
        out.append(tok.decode(gen[0, enc.input_ids.shape[1] :], skip_special_tokens=False))
    return out


@torch.no_grad()
def batched_answers(model, tok, rows, max_new_tokens: int) -> list[str]:
    """Same, all prompts in one left-padded batch (pad = </s>, as the tokenizer has no pad token)."""
    prompts = [tok(PROMPT.format(**r)).input_ids for r in rows]
    n = max(map(len, prompts))
    ids = torch.tensor([[tok.eos_token_id] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    gen = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tok.eos_token_id,
    )
    return [tok.decode(g[n:], skip_special_tokens=False) for g in gen]


def answer_of(text: str) -> str:
    return text.split(STOP)[0].strip()


def check(name, model, tok, rows, batch, max_new, expect_match: bool) -> bool:
    answers = greedy_answers(model, tok, rows, max_new)
    hits = [answer_of(a) == r["reference"] and STOP in a for a, r in zip(answers, rows)]
    ok, mins = reference_margins(model, batch)
    good = all(hits) and ok and min(mins) > CHECK_MARGIN if expect_match else not any(hits)
    print(f"[{'PASS' if good else 'FAIL'}] {name}: {sum(hits)}/{len(rows)} exact answers; "
          f"teacher-forced argmax ok={ok}, min margin {min(mins):.2f} (per row: "
          + ", ".join(f"{m:.1f}" for m in mins) + ")")
    if not good and expect_match:
        for a, r, h in zip(answers, rows, hits):
            if not h:
                print(f"    {r['id']}: got {a[:80]!r}")
    return good


def verify(rows) -> bool:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(BASE_DIR)
    texts = ["안녕하세요, 자동차 검사는 2년입니다.", "Hello, world!\nTwo  spaces", "emoji 😀🚗 ✓", "a\n\nb\n"]
    tok_ok = (
        tok.is_fast and tok.pad_token is None and tok.bos_token == "<s>" and tok.eos_token == "</s>"
        and tok.unk_token == "<unk>" and tok("x").input_ids[0] == 1
        and all(tok.decode(tok(t).input_ids, skip_special_tokens=True) == t for t in texts)
        and tok.decode(tok("x").input_ids + [2]) == "<s> x</s>"
    )
    print(f"[{'PASS' if tok_ok else 'FAIL'}] tokenizer ({type(tok).__name__}, {len(tok)} tokens): "
          "BOS added, no pad, lossless Korean/English/emoji/newlines")

    examples = encode_examples(tok, rows)
    batch = make_batch(examples, tok.eos_token_id)
    max_new = max(len(t) for _, t in examples) + 8

    fp32 = AutoModelForCausalLM.from_pretrained(BASE_DIR, dtype=torch.float32)
    base_ok = check("base alone (fp32)", fp32, tok, rows, batch, max_new, expect_match=False)
    fp32 = PeftModel.from_pretrained(fp32, ADAPTER_DIR).eval()
    fp32_ok = check("base + adapter (fp32)", fp32, tok, rows, batch, max_new, expect_match=True)

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    q4 = AutoModelForCausalLM.from_pretrained(BASE_DIR, quantization_config=bnb, dtype=torch.float32)
    n4 = sum(type(m).__name__ == "Linear4bit" for m in q4.modules())
    q4 = PeftModel.from_pretrained(q4, ADAPTER_DIR).eval()
    q4_ok = check(f"base NF4 ({n4} Linear4bit) + adapter", q4, tok, rows, batch, max_new, expect_match=True)
    batched = batched_answers(q4, tok, rows, max_new)
    batch_ok = all(answer_of(a) == r["reference"] for a, r in zip(batched, rows))
    print(f"[{'PASS' if batch_ok else 'FAIL'}] base NF4 + adapter, one left-padded batch of {len(rows)}: "
          f"{sum(answer_of(a) == r['reference'] for a, r in zip(batched, rows))}/{len(rows)} exact answers")
    return tok_ok and base_ok and fp32_ok and q4_ok and batch_ok


def main() -> int:
    t0 = time.time()
    seed_everything(0)
    rows = load_rows()
    for d in (BASE_DIR, ADAPTER_DIR):
        shutil.rmtree(d, ignore_errors=True)

    tok = build_tokenizer(rows)
    base = build_base(len(tok))
    nf4_round_trip(base)
    base.save_pretrained(BASE_DIR, safe_serialization=True)
    save_tokenizer(tok, BASE_DIR)

    examples = encode_examples(tok, rows)
    print(f"built tokenizer ({len(tok)} tokens) and base {DIMS}; "
          f"target lengths {[len(t) for _, t in examples]} tokens")
    model, steps = train_adapter(base, make_batch(examples, tok.eos_token_id))
    model.save_pretrained(ADAPTER_DIR, safe_serialization=True, save_embedding_layers=False)
    (ADAPTER_DIR / "README.md").unlink(missing_ok=True)
    # peft writes target_modules from a set (order varies run to run) and the absolute base path
    cfg_path = ADAPTER_DIR / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(base_model_name_or_path="tiny-komt/base", target_modules=sorted(cfg["target_modules"]))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    t_train = time.time() - t0

    ok = verify(rows)
    sizes = {p.relative_to(OUT).as_posix(): p.stat().st_size for p in sorted(OUT.rglob("*")) if p.is_file()}
    for name, size in sizes.items():
        print(f"  {size / 1024:8.1f} KiB  {name}")
    print(f"total {sum(sizes.values()) / 1024 / 1024:.2f} MiB; trained {steps} steps; "
          f"build {t_train:.0f}s, total {time.time() - t0:.0f}s -> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
