from types import SimpleNamespace

import pytest

from batch.stops import CONTEXT_TOKENS, StopChecker, StopRule, answer_text, could_end_stop, find_stop, trim_response

STOP = ["<|end|>", "<s>", "###"]


@pytest.mark.parametrize(
    "text, options, expected",
    [
        (" answer text<|end|> trailing", {}, ("answer text", "stop", "<|end|>")),
        (" one ### two <|end|>", {}, ("one", "stop", "###")),
        (" done", {"ended_by": "eos"}, ("done", "eos", None)),  # EOS is a token: the engine leaves it out of the text
        (" a ### b", {"ended_by": "eos"}, ("a", "stop", "###")),
        (" no stop at all ", {}, ("no stop at all", "length", None)),
        ("<unk> keep <unk>the rest", {"special": [(0, 5), (11, 16)]}, ("keep the rest", "length", None)),  # special tokens' text goes
        ("<unk> keep <unk>the rest", {}, ("<unk> keep <unk>the rest", "length", None)),  # ... text that spells one stays
        ("  \n###", {}, ("", "stop", "###")),
        (" x<s>y", {}, ("x", "stop", "<s>")),
        (" 한국어 답변입니다.<|end|>", {}, ("한국어 답변입니다.", "stop", "<|end|>")),
        # defect 1: text that spells the EOS token is text, not EOS
        (" done</s>", {}, ("done</s>", "length", None)),
        (" a</s> b ### c", {}, ("a</s> b", "stop", "###")),
        # include_stop_str_in_output (vLLM tests/detokenizer/test_stop_strings.py _stop_basic)
        (" answer text<|end|> trailing", {"include_stop": True}, ("answer text<|end|>", "stop", "<|end|>")),
        (" x<s>y", {"include_stop": True, "special": [(2, 5)]}, ("x", "stop", "<s>")),  # (the BOS token's text still goes)
        # a stop token ended the row (vLLM tests/detokenizer/test_stop_strings.py _stop_token_id)
        (" volunteer", {"ended_by": 13013}, ("volunteer", "stop", "13013")),
        # min_new_tokens: only a stop word that ends after their text (vLLM tests/detokenizer/test_min_tokens.py)
        (" is Lee, and I'm a student", {"after": len(" is Lee, and I")}, ("is Lee, and I'm a stud", "stop", "e")),
        # defect 3: a trailing U+FFFD may be a character still being written; a U+FFFD inside the text is real
        (" 답\ufffd", {}, ("답\ufffd", "length", None)),
        (" 답\ufffd!", {}, ("답", "stop", "\ufffd")),
    ],
)
def test_trim_rule(text, options, expected):
    stop = ["e"] if "after" in options else ["\ufffd"] if "\ufffd" in text else STOP
    assert trim_response(text, stop, **options) == expected


def test_the_earliest_stop_word_wins_and_at_one_place_the_first_listed():
    assert find_stop("xabc", ["bc", "abc"]) == (1, "abc")
    assert find_stop("xabc", ["ab", "abc"]) == (1, "ab")
    assert find_stop("a.b.c", ["."], after=2) == (3, ".")  # (an occurrence ending at `after` or before does not count)


def test_stop_checker_only_looks_at_generated_tail():
    vocab = {1: "#", 2: "a", 3: "<|end|>", 4: "x" * 50}
    checker = StopChecker(lambda ids: "".join(vocab[i] for i in ids), STOP)
    assert not checker.hit([], [2, 1, 2, 1])
    assert checker.hit([], [2, 1, 1, 1])
    assert checker.hit([], [4, 4, 3])
    assert not checker.hit([1, 1], [1, 2])  # a stop word inside the prompt stops nothing
    # a stop word that ended far back would already have stopped the row; the window is bounded
    assert not checker.hit([], [1, 1, 1] + [4] * 100 + [2])
    assert not StopChecker(lambda ids: "###", []).hit([], [1])


def test_could_end_stop_rules():
    pieces = ["a", "#", "b#c", "\ufffd", ">", " ", "end"]
    assert could_end_stop(pieces, STOP) == [False, True, True, False, True, False, False]
    # a stop word ending in a non-ASCII character can be completed by any byte of it
    assert could_end_stop(pieces, ["끝"]) == [False, False, False, True, False, False, False]
    # decoding a token alone can drop a leading space: such stop words are checked after every token
    assert could_end_stop(pieces, ["###", "\n"]) is None
    assert could_end_stop(pieces, ["a\ufffd"]) is None


def test_a_window_that_starts_inside_a_character_is_widened():
    """Byte fallback decodes a run of byte tokens cut in the middle of a character as U+FFFD
    throughout: the last 14 tokens of 🚗🎉🚗🎉끝 (all bytes) start inside 🎉 and would hide 끝."""
    from transformers import AutoTokenizer

    from tests.conftest import TINY

    tok = AutoTokenizer.from_pretrained(TINY / "base")
    ids = tok("🚗🎉🚗🎉끝", add_special_tokens=False)["input_ids"]
    checker = StopChecker(lambda t: tok.decode(t, skip_special_tokens=False), ["끝"])
    assert checker.window < len(ids) and "끝" not in tok.decode(ids[-checker.window :])
    assert checker.hit([], ids) and not checker.hit([], ids[:-1])


def first_hit(checker: StopChecker, context: list[int], ids: list[int]) -> int | None:
    return next((i for i in range(1, len(ids) + 1) if checker.hit(context, ids[:i])), None)


@pytest.mark.parametrize("min_new_tokens", [0, 7])
@pytest.mark.parametrize("stop", [STOP, ["끝", "!!"], ["<|end|>", "요?\n\n###", "🚗"], [" 자동차", "\n"], ["a\ufffd", "\ufffd!"]])
def test_checks_find_the_first_stop_word_and_skip_only_tokens_that_cannot_end_one(stop, min_new_tokens):
    """On the tiny model's tokenizer (byte fallback: Korean and emoji are runs of byte tokens): the
    first token after which the answer's text (after the prompt, trailing U+FFFD held back) holds a stop
    word ending after the first min_new_tokens tokens' text, found by decoding the whole text, is where
    the incremental check stops -- checking every token, or only those that can end one."""
    import random

    from transformers import AutoTokenizer

    from batch.stops import settled
    from tests.conftest import TINY

    tok = AutoTokenizer.from_pretrained(TINY / "base")
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    pieces = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False)
    every, skipping = StopChecker(decode, stop, None, min_new_tokens), StopChecker(decode, stop, pieces, min_new_tokens)
    if skipping.may_end is not None:
        assert sum(skipping.may_end) < len(pieces) // 4  # most tokens are skipped
    # valid UTF-8 made of stop words, Korean and emoji (byte tokens), and tokens that are not a
    # non-ASCII character's bytes; real U+FFFD (its three byte tokens) and half-written characters
    texts = stop + ["한국어 답변입니다", "🚗🎉", " ## #> <|", "끝!", "<", "끝", "#", "자동차", "a\ufffd!"]
    parts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    whole = [i for i, piece in enumerate(pieces) if "\ufffd" not in piece]
    prompts = [tok(p)["input_ids"] for p in ["### instruction: 안녕\n\n### Response:", "Hi", "자동차 검사 ### 기간"]]
    rng = random.Random(0)
    hits = 0
    for _ in range(300):
        ids = []
        while len(ids) < 40:
            ids += rng.choice(parts) if rng.random() < 0.6 else [rng.choice(whole)]
        context = rng.choice(prompts)[-CONTEXT_TOKENS:]

        def text(n):
            return settled(answer_text(decode, context, ids[:n]))

        after = len(text(min_new_tokens)) if min_new_tokens else 0
        truth = next((i for i in range(min_new_tokens + 1, len(ids) + 1) if find_stop(text(i), stop, after)), None)
        hits += truth is not None
        assert first_hit(every, context, ids) == truth == first_hit(skipping, context, ids), (context, ids)
    assert hits > 100


TOK = None


def tiny_tokenizer():
    global TOK
    if TOK is None:
        from transformers import AutoTokenizer

        from tests.conftest import TINY

        TOK = AutoTokenizer.from_pretrained(TINY / "base")
    return TOK


PROMPT = "### instruction: 자동차 검사 기간은?\n\n### Response:"


def answer_ids(parts: list) -> list[int]:
    """Token ids whose text after PROMPT is exactly the parts joined: a str is tokenized (without the
    tokenizer's leading space, unless it begins with one), a list is token pieces as they are."""
    tok = tiny_tokenizer()
    ids = []
    for part in parts:
        if isinstance(part, list):
            ids += tok.convert_tokens_to_ids(part)
        else:
            got = tok(part, add_special_tokens=False)["input_ids"]
            ids += got[1:] if not part.startswith(" ") and tok.convert_ids_to_tokens(got[0]) == "▁" else got
    return ids


def generate(answer: list, eos_at_end: bool = False, **settings) -> tuple[str, str, str | None, int]:
    """What the engine makes of a model that generates `answer` (then EOS): the tokens run until EOS or
    a stop token (flagged on the device; never before min_new_tokens: the logits are masked) or until
    the stop check hits; then the rule. (response, finish_reason, stop_reason, completion_tokens)"""
    tok = tiny_tokenizer()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    prompt = tok(PROMPT)["input_ids"]
    ids = answer_ids(answer) + [tok.eos_token_id] * eos_at_end
    pieces = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False)
    s = SimpleNamespace(**{"stop": [], "stop_token_ids": [], "min_new_tokens": 0, "include_stop_str_in_output": False, "max_new_tokens": 10**6, **settings})
    rule = StopRule(decode, s.stop, {tok.eos_token_id}, s.stop_token_ids, tok.all_special_ids, s.min_new_tokens, s.include_stop_str_in_output, pieces)
    ends = {tok.eos_token_id, *s.stop_token_ids}
    generated = []
    for t in ids:
        if t in ends and len(generated) < s.min_new_tokens:
            continue  # (masked: the model's next choice -- here the answer's next token)
        generated.append(t)
        if t in ends or len(generated) == s.max_new_tokens or rule.hit(prompt, generated):
            break
    return (*rule.finish(prompt, generated), len(generated))


def pieces_of(text: str) -> list[str]:
    return ["<0x%02X>" % b for b in text.encode()]


STORY = "VLLM is a 100% volunteer organization. We are a group of people"  # vLLM's stop-string story


@pytest.mark.parametrize(
    "answer, settings, expected",
    [
        # vLLM tests/detokenizer/test_stop_strings.py _stop_basic
        ([STORY], {"stop": ["."]}, ("VLLM is a 100% volunteer organization", "stop", ".")),
        ([STORY], {"stop": ["."], "include_stop_str_in_output": True}, ("VLLM is a 100% volunteer organization.", "stop", ".")),
        # ... _stop_multi_tokens: a stop word over several tokens; the earlier-listed word is not in the text
        ([STORY], {"stop": ["group of peo", "short"]}, ("VLLM is a 100% volunteer organization. We are a", "stop", "group of peo")),
        ([STORY], {"stop": ["group of peo", "short"], "include_stop_str_in_output": True},
         ("VLLM is a 100% volunteer organization. We are a group of peo", "stop", "group of peo")),
        # ... _stop_partial_token: a stop word inside one token ("an" in "an", "iz" -> "gani")
        ([STORY], {"stop": ["gani"]}, ("VLLM is a 100% volunteer or", "stop", "gani")),
        ([STORY], {"stop": ["gani"], "include_stop_str_in_output": True}, ("VLLM is a 100% volunteer organi", "stop", "gani")),
        # ... _stop_token_id: stop_token_ids end a row, stop_reason is the id; the token's text is kept with include
        ([STORY], {"stop_token_ids": [1069]}, ("VLLM is a 100% volunteer organ", "stop", "1069")),  # 1069: "iz"
        ([STORY], {"stop_token_ids": [1069], "include_stop_str_in_output": True}, ("VLLM is a 100% volunteer organiz", "stop", "1069")),
        # vLLM tests/v1/engine/test_stop_reason.py: EOS -> finish_reason eos (vLLM: stop), stop_reason none; length: none
        (["짧은 답"], {"stop": ["."]}, ("짧은 답", "eos", None)),
        ([STORY], {"stop": ["!"], "max_new_tokens": 10}, ("VLLM is a 100%", "length", None)),
        # vLLM tests/detokenizer/test_min_tokens.py: stop strings ignored before min tokens
        (["is Lee, and I'm a student"], {"stop": ["e"]}, ("is L", "stop", "e")),
        (["is Lee, and I'm a student"], {"stop": ["e"], "min_new_tokens": 6}, ("is Lee, and I'm a stud", "stop", "e")),
        # vLLM tests/v1/e2e/test_min_tokens.py: no EOS or stop token before min tokens (masked: the answer
        # goes on; here it runs out)
        (["짧은 답"], {"min_new_tokens": 30}, ("짧은 답", "length", None)),
        (["짧은 답"], {"min_new_tokens": 30, "stop_token_ids": [509]}, ("짧 답", "length", None)),  # 509: "은" (masked: not chosen)
        (["짧은 답"], {"stop_token_ids": [509]}, ("짧", "stop", "509")),
        # transformers tests/generation/test_stopping_criteria.py test_stop_string_criteria, stop_strings
        # ["<|im_end|>", "stop", "e nd"]: true_strings stop ...
        (["<|im_start|><|im_end|>"], {"stop": ["<|im_end|>", "stop", "e nd"]}, ("<|im_start|>", "stop", "<|im_end|>")),
        (["<|im_start|><|im_end|<|im_end|>"], {"stop": ["<|im_end|>", "stop", "e nd"]}, ("<|im_start|><|im_end|", "stop", "<|im_end|>")),
        ([">><|im_start|>>stop"], {"stop": ["<|im_end|>", "stop", "e nd"]}, (">><|im_start|>>", "stop", "stop")),
        (["e nd"], {"stop": ["<|im_end|>", "stop", "e nd"]}, ("", "stop", "e nd")),
        # ... false_strings do not (generation runs to its end)
        (["<|im_start|><|im_end|"], {"stop": ["<|im_end|>", "stop", "e nd"]}, ("<|im_start|><|im_end|", "eos", None)),
        (["en d eNd |im_end|> s"], {"stop": ["<|im_end|>", "stop", "e nd"]}, ("en d eNd |im_end|> s", "eos", None)),
        # ... "<|im_end|><|im_start|>" is false there only because the criterion looks at the text's end
        # once; generating it, the row stops at the token that completes "<|im_end|>"
        (["<|im_end|><|im_start|>"], {"stop": ["<|im_end|>", "stop", "e nd"]}, ("", "stop", "<|im_end|>")),
        # the README's default stop words; Korean across byte tokens; regex characters literally
        (["답변입니다.<|end|>더"], {"stop": STOP}, ("답변입니다.", "stop", "<|end|>")),
        (["끝 🚗 다음"], {"stop": ["🚗"]}, ("끝", "stop", "🚗")),
        (["a.*b (a.*b) [x]"], {"stop": ["(a.*b)"]}, ("a.*b", "stop", "(a.*b)")),
        # defect 1: byte tokens that spell "</s>" are text: the answer goes on to the real EOS
        (["답", pieces_of("</s>"), "더 있음"], {"stop": STOP}, ("답</s>더 있음", "eos", None)),
        (["답", pieces_of("</s>"), "더 있음"], {"stop": ["</s>"]}, ("답", "stop", "</s>")),  # ... unless it is a stop word
        (["답"], {"stop": ["</s>"], "include_stop_str_in_output": True}, ("답", "eos", None)),  # (the EOS token is no such text)
        # defect 3: a stop word with U+FFFD matches a real U+FFFD, not a character half written (끝's bytes)
        (["끝 이다 \ufffd 뒤"], {"stop": ["\ufffd"]}, ("끝 이다", "stop", "\ufffd")),
        (["자동차 끝 뒤"], {"stop": ["\ufffd"]}, ("자동차 끝 뒤", "eos", None)),
        # item 4: the answer's first token's leading space counts (SentencePiece's "▁")
        ([" 자동차 검사"], {"stop": [" 자동차"]}, ("", "stop", " 자동차")),
        ([" 자동차 검사 자동차"], {"stop": [" 검"]}, ("자동차", "stop", " 검")),
        (["\n답변\n끝"], {"stop": ["\n"]}, ("", "stop", "\n")),
    ],
)
def test_rule_on_the_tiny_tokenizer(answer, settings, expected):
    response, reason, stop_reason, tokens = generate(answer, eos_at_end=True, **settings)
    assert (response, reason, stop_reason) == expected


def test_completion_tokens_count_every_generated_token():
    """defect 1: an answer that spells "</s>" in byte tokens counts the tokens after it too."""
    answer = ["답", pieces_of("</s>"), "더 있음"]
    assert generate(answer, eos_at_end=True, stop=STOP)[3] == len(answer_ids(answer)) + 1
    assert generate([" 자동차 검사"], eos_at_end=True, stop=[" 자동차"])[3] == 1  # stopped at the first token
    assert generate(["is Lee, and I'm a student"], stop=["e"], min_new_tokens=6)[3] > 6


def test_the_first_token_leading_space_and_stop_reason_end_to_end(tmp_path):
    """item 4 on the tiny model through `komt-batch run`: its answers to seed rows 0 and 4 begin with
    "자동차" (the token "▁자동차"), so the stop word " 자동차" ends them at their first token, not at
    a later " 자동차"; "\\n" ends rows 6 and 7 after their first line. The file says which word did."""
    import pyarrow.parquet as pq

    from tests.conftest import komt, make_job, seed_rows, write_jsonl

    rows = [{"id": f"s{i}", "instruction": r["instruction"]} for i, r in enumerate(seed_rows())]
    job = make_job(tmp_path, write_jsonl(tmp_path / "in.jsonl", rows), generation={"max_new_tokens": 48, "do_sample": False, "stop": [" 자동차", "\n"]})
    p = komt("run", job, "--no-progress")
    assert p.returncode == 0, p.stderr
    out = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
    got = {r["id"]: (r["response"], r["finish_reason"], r["stop_reason"], r["completion_tokens"]) for r in out}
    assert got["s0"] == ("", "stop", " 자동차", 1) and got["s4"] == ("", "stop", " 자동차", 1)
    assert got["s6"][:3] == ("일본", "stop", "\n") and got["s7"][:3] == ("워너 브라더스", "stop", "\n")
    assert all(why is None for _, reason, why, _ in got.values() if reason != "stop")


def test_a_stop_token_id_outside_the_vocabulary_is_refused_by_validate_and_run(tmp_path):
    from tests.conftest import komt, make_job, seed_rows, write_jsonl

    job = make_job(tmp_path, write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "instruction": seed_rows()[0]["instruction"]}]))
    for command in ("validate", "run"):
        p = komt(command, job, "--no-progress", "generation.stop_token_ids=[2, 99999]") if command == "run" else komt(command, job, "generation.stop_token_ids=[2, 99999]")
        assert p.returncode == 2 and "Traceback" not in p.stderr, (command, p.stderr)
        assert "generation.stop_token_ids: 99999 is not a token of the model (its tokenizer has 1536)" in p.stderr, (command, p.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_the_defects_through_the_engine_with_scripted_answers(fixed_shapes, monkeypatch):
    """The tiny model's engine (prefill, decode steps, the host's stop check, the rule), its next
    tokens scripted per row (by the row's seed and token count): defect 1 (byte tokens that spell
    "</s>"), defect 3 (a half-written character is no U+FFFD), item 4 (the first token's space)."""
    import torch

    from batch import decode_step
    from tests.test_exactness import TEMPLATE, load, with_steps

    eos = tiny_tokenizer().eos_token_id
    answers = [  # (the answer's tokens then EOS, what the engine gives)
        (["답", pieces_of("</s>"), "더 있음"], ("답</s>더 있음", "eos", None)),
        (["끝 뒤 이다"], ("끝 뒤 이다", "eos", None)),
        (["끝 이다 \ufffd 뒤"], ("끝 이다", "stop", "\ufffd")),
        ([" 자동차 검사"], ("", "stop", " 자동차")),
    ]
    script = [answer_ids(a) + [eos] for a, _ in answers]

    def choose(logits, seeds, steps, settings):
        # (a fixed-shape step runs one ahead, and its padding rows have other seeds: EOS past the script)
        return torch.tensor([script[s][k] if s < len(script) and k < len(script[s]) else eos for s, k in zip(seeds.tolist(), steps.tolist())])

    monkeypatch.setattr(decode_step, "choose", choose)
    engine = with_steps(load("float32", stop=["\ufffd", " 자동차", "###"]), fixed_shapes)
    prompts = engine.tokenize([TEMPLATE.format(q) for q in ["자동차 검사 기간은?", "안녕", "Why?", "끝"]])
    got = [(c.response, c.finish_reason, c.stop_reason, c.completion_tokens) for c in engine.generate(prompts, list(range(4)))]
    # (U+FFFD's last byte token ends it only once the next token shows it is no half-written character)
    stop_at = [len(script[0]), len(script[1]), len(answer_ids(["끝 이다 \ufffd"])) + 1, 1]
    assert got == [(*expected, n) for (_, expected), n in zip(answers, stop_at)]
