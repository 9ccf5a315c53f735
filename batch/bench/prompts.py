"""The bench's prompts: the job's template around spans of English and Korean text, lognormal token lengths."""

from __future__ import annotations

import json
import math

import numpy as np

from batch.bench.settings import ROOT, BenchConfig
from batch.config import (
    DEFAULT_TEMPLATE,
)

# --- prompts -------------------------------------------------------------------------------------

ENGLISH = """\
The quick brown fox jumps over the lazy dog. A batch job reads prompts from a Parquet file, generates
answers with a language model and writes them back, one row per prompt. Resumable jobs write
checkpoints so that a crash does not lose finished work, and a cluster scheduler may stop a job at
any time. The weather in Seoul is cold in winter and hot and humid in summer; spring and autumn are
short but pleasant. To renew a driving licence you need an application form, a recent photograph
and a medical certificate. Interest on a savings account is paid monthly and taxed at the source.
Please summarise the following report in three sentences, keeping the numbers exact. Translate the
paragraph below into Korean and keep the names of people and places unchanged. Explain, step by
step, why the sky is blue, and then why sunsets are red. Write a short, polite e-mail asking a
landlord to repair the heating before the end of the month.
"""


def _korean_text() -> str:
    lines = []
    for name in ("seed_examples.jsonl", "demo_prompts.jsonl"):
        path = ROOT / "data" / name
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    lines += [str(row[k]) for k in ("instruction", "reference") if k in row]
    return " ".join(lines) or "자동차 종합검사 의무기간은 2년입니다. 누전차단기는 화재 위험을 줄입니다."


def make_prompts(cfg: BenchConfig, tokenizer, n: int, seed: int) -> list[str]:
    """`n` prompts (the job's template around a span of English/Korean text), their token lengths
    drawn from a lognormal clipped to [prompt_min, prompt_max]. With `shared_instruction`, every
    prompt's text starts with the same instruction of about that many tokens, and the lognormal
    length is its item's (the text after it)."""
    rng = np.random.default_rng(seed)
    targets = np.clip(np.round(rng.lognormal(math.log(cfg.prompt_median), cfg.prompt_sigma, n)), cfg.prompt_min, cfg.prompt_max).astype(int)
    paragraphs = [ENGLISH, _korean_text()]
    corpus: list[int] = []
    while len(corpus) < 3 * cfg.prompt_max:
        for p in paragraphs:
            corpus += tokenizer(p.replace("\n", " "), add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(corpus)
    starts = [i for i, piece in enumerate(pieces) if piece.startswith("▁") and i + cfg.prompt_max < len(corpus)]
    shared = ""
    if cfg.shared_instruction:
        shared = "Label the item below as the guidelines say. Guidelines: " + tokenizer.decode(corpus[: cfg.shared_instruction]).strip() + "\nItem: "
        targets += len(tokenizer(shared, add_special_tokens=False)["input_ids"])
    frame = len(tokenizer(DEFAULT_TEMPLATE.format(instruction=shared))["input_ids"])
    prompts = []
    for target in targets:
        body = max(1, int(target) - frame)
        start = int(rng.choice(starts))
        while True:
            text = DEFAULT_TEMPLATE.format(instruction=shared + tokenizer.decode(corpus[start : start + body]).strip())
            length = len(tokenizer(text)["input_ids"])
            if length <= cfg.prompt_max or body == 1:
                break
            body = max(1, body - (length - cfg.prompt_max))
        prompts.append(text)
    return prompts
