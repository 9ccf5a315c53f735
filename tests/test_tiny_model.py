"""Checks on the shipped tiny komt stand-in (built by models/build_tiny.py): NF4 base + LoRA on CPU."""

import json
from pathlib import Path

import pytest
import torch

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny-komt"
SEEDS = Path(__file__).resolve().parents[1] / "data" / "seed_examples.jsonl"
PROMPT = "### instruction: {instruction}\n\n### Response:"
STOP = "<|end|>"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY / "base")


@pytest.fixture(scope="module")
def rows():
    rows = [json.loads(line) for line in SEEDS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


@pytest.fixture(scope="module")
def model():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(TINY / "base", quantization_config=bnb, dtype=torch.float32)
    return PeftModel.from_pretrained(base, TINY / "adapter").eval()


def generate(model, tok, instruction: str, max_new_tokens: int = 128) -> str:
    enc = tok(PROMPT.format(instruction=instruction), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=False)


def test_tokenizer_like_llama2(tok):
    assert tok.is_fast
    assert tok.pad_token is None
    assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<0x00>", "<0x0A>", "<0xFF>"]) == [3, 13, 258]
    ids = tok("안녕").input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=False) == "<s> 안녕</s>"


@pytest.mark.parametrize(
    "text",
    ["자동차 공기압 관리가 왜 중요하나요?", "Hello, world! Two  spaces.", "emoji 😀🚗👍🏽 ok", "line 1\nline 2\n\n### Response:"],
)
def test_tokenizer_round_trip(tok, text):
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("seed_id", ["seed-00", "seed-06", "seed-08"])
def test_adapter_answers_reference_then_stop(model, tok, rows, seed_id):
    row = rows[seed_id]
    text = generate(model, tok, row["instruction"])
    assert STOP in text
    assert text.split(STOP)[0].strip() == row["reference"]


def test_base_alone_does_not_answer(model, tok, rows):
    row = rows["seed-00"]
    with model.disable_adapter():
        text = generate(model, tok, row["instruction"], max_new_tokens=40)
    assert row["reference"][:10] not in text
