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


def could_end_stop(pieces: Sequence[str], stop: Sequence[str]) -> list[bool] | None:
    """For each token id, whether appending that token can complete a stop word; None: any token can.

    `pieces[i]` is token i's text decoded alone. A stop word that appears when a token is added ends
    inside the text that token adds, so it ends with a character of that text -- or with a character
    whose last byte the token adds: a token that decodes alone to U+FFFD (a byte-fallback or partial
    byte token) may complete any non-ASCII character. Decoding a token alone can drop a leading space,
    and a window of tokens can start inside a character (shown as U+FFFD): stop words that end in
    whitespace or contain U+FFFD are therefore checked after every token."""
    stop = [w for w in stop if w]
    if any(w[-1].isspace() or "\ufffd" in w for w in stop):
        return None
    last = {w[-1] for w in stop}
    wide = any(ord(c) > 127 for c in last)
    return [any(c in piece for c in last) or (wide and "\ufffd" in piece) for piece in pieces]


class StopChecker:
    """Says, after each new token, whether a row's generated text now contains a stop word.

    It decodes only the last few tokens (enough to hold the longest stop word even if every byte is
    its own token), so the cost per step does not grow with the response; and with `pieces` (every
    token's text, see could_end_stop) only after a token that can complete a stop word.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], pieces: Sequence[str] | None = None):
        self.decode = decode
        self.stop = [w for w in stop if w]
        self.window = 4 * max((len(w.encode("utf-8")) for w in self.stop), default=0) + 2
        self.may_end = could_end_stop(pieces, self.stop) if pieces is not None and self.stop else None

    def hit(self, generated: list[int]) -> bool:
        if not self.stop:
            return False
        last = generated[-1]
        if self.may_end is not None and last < len(self.may_end) and not self.may_end[last]:
            return False
        start = max(0, len(generated) - self.window)
        tail = self.decode(generated[start:])
        # A window that starts inside a character (a run of byte-fallback tokens cut in the middle)
        # decodes that whole run as U+FFFD: start it up to 3 tokens earlier, at the character's first byte.
        while tail.startswith("\ufffd") and start > 0 and len(generated) - start < self.window + 3:
            start -= 1
            tail = self.decode(generated[start:])
        return any(w in tail for w in self.stop)
