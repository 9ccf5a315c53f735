import pytest

from batch.stops import StopChecker, trim_response

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
