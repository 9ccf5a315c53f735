"""Stop words: the response-trimming rule and the per-row, incremental stop check (both pure).

The rule, in one place:
  decode the row's generated tokens with special tokens kept; cut before the earliest occurrence of
  any stop word or of the EOS token; remove special-token strings from what is left; strip
  surrounding whitespace. finish_reason is `stop` when a stop word cut it, `eos` when EOS did, and
  `length` when neither occurs (max_new_tokens ran out first).
Only generated text is searched, so a stop word inside the prompt stops nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def trim_response(text: str, stop: Sequence[str], eos: str | None, special: Sequence[str]) -> tuple[str, str]:
    """Apply the rule to a row's decoded generation: (response, finish_reason)."""
    cut, reason = len(text), "length"
    for word in stop:
        at = text.find(word)
        if at != -1 and at < cut:
            cut, reason = at, "stop"
    if eos:
        at = text.find(eos)
        if at != -1 and at < cut:  # a tie goes to the stop word: it was found first in the rule
            cut, reason = at, "eos"
    kept = text[:cut]
    for token in sorted(special, key=len, reverse=True):
        if token:
            kept = kept.replace(token, "")
    return kept.strip(), reason


class StopChecker:
    """Says, after each new token, whether a row's generated text now contains a stop word.

    It decodes only the last few tokens (enough to hold the longest stop word even if every byte is
    its own token), so the cost per step does not grow with the response.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]):
        self.decode = decode
        self.stop = [w for w in stop if w]
        self.window = 4 * max((len(w.encode("utf-8")) for w in self.stop), default=0) + 2

    def hit(self, generated: list[int]) -> bool:
        if not self.stop:
            return False
        tail = self.decode(generated[-self.window :])
        return any(w in tail for w in self.stop)
