"""Stop words: the response-trimming rule and the per-row, incremental stop check (both pure).

The rule, in one place (as vLLM's detokenizer and stop-string check have it):
  a row ends on a token -- EOS (finish_reason `eos`), one of stop_token_ids (`stop`) -- or on a stop
  word in its text (`stop`), or at max_new_tokens (`length`). The text is the answer as it reads after
  the prompt: the generated tokens decoded after the prompt's last tokens (so the first token's
  leading space counts), special tokens kept, the ending token left out. A stop word is searched in
  that text only (a stop word inside the prompt stops nothing), only where the text will stay as
  decoded (trailing U+FFFD of a character still being written is held back), and only where it ends
  after the first min_new_tokens tokens' text. The response is the text before the earliest stop word
  (through it, and through the ending token's text, with include_stop_str_in_output), the special
  tokens' text removed, surrounding whitespace stripped. EOS is a token: text that spells `</s>` is
  text. stop_reason: the stop word, or the stop token's id; none for `eos` and `length`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

CONTEXT_TOKENS = 5  # the prompt's last tokens the answer is decoded after (vLLM's initial prefix offset)
REPLACEMENT = "\ufffd"


def settled(text: str) -> str:
    """The text that will stay as decoded: trailing U+FFFD may be a character still being written."""
    return text.rstrip(REPLACEMENT)


def answer_text(decode: Callable[[list[int]], str], context: list[int], generated: list[int]) -> str:
    """`generated` decoded after `context` (the prompt's last tokens): the text it adds to them."""
    before = decode(context)
    whole = decode(context + generated)
    return whole[len(before) :] if whole.startswith(before) else decode(generated)


def find_stop(text: str, stop: Sequence[str], after: int = 0) -> tuple[int, str] | None:
    """The earliest occurrence of a stop word in `text` that ends after character `after`: (where, word);
    at one place the word first in the list."""
    best = None
    for word in stop:
        at = text.find(word, max(0, after - len(word) + 1))
        if at != -1 and (best is None or at < best[0]):
            best = (at, word)
    return best


def trim_response(text: str, stop: Sequence[str], *, after: int = 0, special: Sequence[tuple[int, int]] = (),
                  include_stop: bool = False, ended_by: str | int | None = None) -> tuple[str, str, str | None]:
    """Apply the rule to a row's answer text: (response, finish_reason, stop_reason).

    `after`: the length of the settled text of the first min_new_tokens tokens; `special`: the spans
    of special tokens' text in `text`; `ended_by`: "eos", a stop token's id, or None (no ending token)."""
    found = find_stop(settled(text), stop, after)
    if found is not None:
        at, word = found
        cut, reason, why = at + (len(word) if include_stop else 0), "stop", word
    elif ended_by is not None:
        cut, reason, why = len(text), "eos" if ended_by == "eos" else "stop", None if ended_by == "eos" else str(ended_by)
    else:
        cut, reason, why = len(text), "length", None
    kept, at = [], 0
    for a, b in sorted(special):
        if a >= cut:
            break
        kept.append(text[at:a])
        at = max(at, b)
    kept.append(text[at:cut] if at < cut else "")
    return "".join(kept).strip(), reason, why


def could_end_stop(pieces: Sequence[str], stop: Sequence[str]) -> list[bool] | None:
    """For each token id, whether appending that token can complete a stop word; None: any token can.

    `pieces[i]` is token i's text decoded alone. A stop word that appears when a token is added ends
    inside the text that token adds, so it ends with a character of that text -- or with a character
    whose last byte the token adds: a token that decodes alone to U+FFFD (a byte-fallback or partial
    byte token) may complete any non-ASCII character. Decoding a token alone can drop a leading space,
    and a window of tokens can start inside a character (shown as U+FFFD): stop words that end in
    whitespace or contain U+FFFD are therefore checked after every token."""
    stop = [w for w in stop if w]
    if any(w[-1].isspace() or REPLACEMENT in w for w in stop):
        return None
    last = {w[-1] for w in stop}
    wide = any(ord(c) > 127 for c in last)
    return [any(c in piece for c in last) or (wide and REPLACEMENT in piece) for piece in pieces]


class StopChecker:
    """Says, after each new token, whether a row's answer text now holds a stop word (by the rule above).

    It decodes only the last few tokens (enough to hold the longest stop word even if every byte is
    its own token), after the prompt's last tokens while the answer is short, so the cost per step
    does not grow with the response; and with `pieces` (every token's text, see could_end_stop) only
    after a token that can complete a stop word. Before min_new_tokens tokens no stop word counts, and
    then only one that ends after their text (vLLM's min_tokens)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], pieces: Sequence[str] | None = None,
                 min_new_tokens: int = 0):
        self.decode = decode
        self.stop = [w for w in stop if w]
        self.min_new_tokens = min_new_tokens
        self.window = 4 * max((len(w.encode("utf-8")) for w in self.stop), default=0) + 2
        self.may_end = could_end_stop(pieces, self.stop) if pieces is not None and self.stop else None

    def hit(self, context: list[int], generated: list[int]) -> bool:
        """`context`: the prompt's last tokens (CONTEXT_TOKENS); `generated`: the row's tokens so far."""
        if not self.stop or len(generated) <= self.min_new_tokens:
            return False
        last = generated[-1]
        if self.may_end is not None and last < len(self.may_end) and not self.may_end[last]:
            return False
        tokens = context + generated
        floor = len(context) + self.min_new_tokens  # no stop word ends in the text of tokens before it
        start = max(0, len(tokens) - self.window)
        tail = self.decode(tokens[start:])
        # A window that starts inside a character (a run of byte-fallback tokens cut in the middle)
        # decodes that whole run as U+FFFD: start it up to 3 tokens earlier, at the character's first byte.
        while tail.startswith(REPLACEMENT) and start > 0 and len(tokens) - start < self.window + 3:
            start -= 1
            tail = self.decode(tokens[start:])
        prompt = len(self.decode(tokens[start : len(context)])) if start < len(context) else 0  # (the text before the answer's)
        after = len(settled(self.decode(tokens[start:floor]))) - prompt if start < floor else 0
        return find_stop(settled(tail)[prompt:], self.stop, after) is not None


@dataclass
class StopRule:
    """The rule for one job: `hit` after each token (is the row's text at a stop word?), `finish` when
    the row has ended (its response, finish_reason and stop_reason). `prompt` is the row's prompt ids,
    `generated` its tokens so far, the ending one included; EOS and stop tokens end a row on the device."""

    decode: Callable[[list[int]], str]
    stop: Sequence[str] = ()
    eos_ids: Collection[int] = ()
    stop_token_ids: Collection[int] = ()
    special_ids: Collection[int] = ()
    min_new_tokens: int = 0
    include_stop: bool = False
    pieces: Sequence[str] | None = None  # every token's text (see could_end_stop); None: check after every token
    checker: StopChecker = field(init=False)

    def __post_init__(self):
        self.checker = StopChecker(self.decode, self.stop, self.pieces, self.min_new_tokens)

    def hit(self, prompt: list[int], generated: list[int]) -> bool:
        return self.checker.hit(prompt[-CONTEXT_TOKENS:], generated)

    def finish(self, prompt: list[int], generated: list[int]) -> tuple[str, str, str | None]:
        last = generated[-1] if generated else None
        ended_by = "eos" if last in self.eos_ids else last if last in self.stop_token_ids else None
        # (EOS is never text: its own text would be a special token's, removed, or match a stop word "</s>")
        body = generated[:-1] if ended_by == "eos" or (ended_by is not None and not self.include_stop) else generated
        context = prompt[-CONTEXT_TOKENS:]

        def text(n: int) -> str:
            return answer_text(self.decode, context, body[:n])

        after = len(settled(text(self.min_new_tokens))) if self.min_new_tokens else 0
        special = [(len(text(i)), len(text(i + 1))) for i, t in enumerate(body) if t in self.special_ids]
        return trim_response(text(len(body)), self.stop, after=after, special=special, include_stop=self.include_stop, ended_by=ended_by)
