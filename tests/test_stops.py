import pytest

from batch.stops import StopChecker, could_end_stop, trim_response

STOP = ["<|end|>", "<s>", "###"]
SPECIAL = ["<s>", "</s>", "<unk>"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (" answer text<|end|> trailing", ("answer text", "stop")),
        (" one ### two <|end|>", ("one", "stop")),
        (" done</s>", ("done", "eos")),
        (" a</s> b ### c", ("a", "eos")),
        (" a ### b</s>", ("a", "stop")),
        (" no stop at all ", ("no stop at all", "length")),
        ("<unk> keep <unk>the rest", ("keep the rest", "length")),
        ("  \n###", ("", "stop")),
        (" x<s>y", ("x", "stop")),
        (" 한국어 답변입니다.<|end|>", ("한국어 답변입니다.", "stop")),
    ],
)
def test_trim_rule(text, expected):
    assert trim_response(text, STOP, "</s>", SPECIAL) == expected


def test_stop_checker_only_looks_at_generated_tail():
    vocab = {1: "#", 2: "a", 3: "<|end|>", 4: "x" * 50}
    checker = StopChecker(lambda ids: "".join(vocab[i] for i in ids), STOP)
    assert not checker.hit([2, 1, 2, 1])
    assert checker.hit([2, 1, 1, 1])
    assert checker.hit([4, 4, 3])
    # a stop word that ended far back would already have stopped the row; the window is bounded
    assert not checker.hit([1, 1, 1] + [4] * 100 + [2])
    assert not StopChecker(lambda ids: "###", []).hit([1])


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
    assert checker.hit(ids) and not checker.hit(ids[:-1])


def first_hit(checker: StopChecker, ids: list[int]) -> int | None:
    return next((i for i in range(1, len(ids) + 1) if checker.hit(ids[:i])), None)


@pytest.mark.parametrize("stop", [STOP, ["끝", "!!"], ["<|end|>", "요?\n\n###", "🚗"]])
def test_checks_find_the_first_stop_word_and_skip_only_tokens_that_cannot_end_one(stop):
    """On the tiny model's tokenizer (byte fallback: Korean and emoji are runs of byte tokens): the
    first token after which the generated text contains a stop word, found by decoding the whole text,
    is where the incremental check stops -- checking every token, or only those that can end one."""
    import random

    from transformers import AutoTokenizer

    from tests.conftest import TINY

    tok = AutoTokenizer.from_pretrained(TINY / "base")
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    pieces = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False)
    every, skipping = StopChecker(decode, stop), StopChecker(decode, stop, pieces)
    assert sum(skipping.may_end) < len(pieces) // 4  # most tokens are skipped
    # valid UTF-8 made of stop words, Korean and emoji (byte tokens), and tokens that are not a
    # non-ASCII character's bytes
    texts = stop + ["한국어 답변입니다", "🚗🎉", " ## #> <|", "끝!", "<", "끝", "#"]
    parts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    whole = [i for i, piece in enumerate(pieces) if "\ufffd" not in piece]
    rng = random.Random(0)
    hits = 0
    for _ in range(300):
        ids = []
        while len(ids) < 40:
            ids += rng.choice(parts) if rng.random() < 0.6 else [rng.choice(whole)]
        truth = next((i for i in range(1, len(ids) + 1) if any(w in decode(ids[:i]) for w in stop)), None)
        hits += truth is not None
        assert first_hit(every, ids) == truth == first_hit(skipping, ids), ids
    assert hits > 100
