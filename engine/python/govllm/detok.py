"""Incremental detokenization and stop-string matching, independent of any engine.

``IncrementalDetokenizer`` turns a growing list of token ids into text increments that never end
inside a UTF-8 character: byte-level BPE tokens can carry half a character, which a tokenizer
decodes as U+FFFD, so an increment is held back while the decoded window still ends in U+FFFD.
It decodes a small sliding window (the "prefix/read offset" scheme of vLLM and TGI) so each token
costs O(1), and it seeds the window with the tail of the prompt so that tokenizers whose decode
depends on the left context (SentencePiece's leading space) produce the same text as a full decode.

``StopStringMatcher`` implements vLLM's stop-string semantics on top of those increments: text that
could still be the start of a stop string is held back until disambiguated, and when a stop string
matches, the output is truncated right before it (the stop string itself is never emitted). With
``min_tokens``, as in vLLM, the text of the first min_tokens tokens cannot hold a match: a stop
string must end in the text of a later token (it may start earlier).

``TextStream`` combines both for one choice of one request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"

# Prompt tokens kept as left context for the first generated tokens (vLLM uses 5 as well).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Stateful decoder for one sequence.

    ``decode`` maps a list of token ids to text (typically ``tokenizer.decode(ids,
    skip_special_tokens=True)``); it must be a pure function of its input.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_token_ids: Sequence[int] = (),
        context_tokens: int = PROMPT_CONTEXT_TOKENS,
    ) -> None:
        self._decode = decode
        context = list(prompt_token_ids[-context_tokens:]) if context_tokens > 0 else []
        self._tokens: list[int] = context
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(context)  # end of the text already emitted
        self._num_context = len(context)

    @property
    def num_generated(self) -> int:
        return len(self._tokens) - self._num_context

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text they complete (possibly empty while a character is split)."""
        if not token_ids:
            return ""
        self._tokens.extend(token_ids)
        return self._advance()

    def flush(self) -> str:
        """Text still held back at the end of the sequence.

        A sequence that ends inside a UTF-8 character (e.g. cut by max_tokens) leaves an incomplete
        byte sequence that decodes to U+FFFD; those trailing replacement characters are dropped,
        as vLLM does, so an increment is never half a character.
        """
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._tokens[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._tokens)
        if len(full_text) <= len(prefix_text):
            return ""
        return full_text[len(prefix_text) :].rstrip(REPLACEMENT_CHAR)

    def _advance(self) -> str:
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._tokens[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            delta = full_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return delta
        return ""


class StopStringMatcher:
    """Holds back text that may begin a stop string; truncates the output before a matched one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._held = ""
        self.matched: str | None = None

    @property
    def held(self) -> str:
        return self._held

    def feed(self, text: str, armed: bool = True) -> str:
        """Add decoded text; return the part that can be emitted now.

        ``armed=False`` (text of the first min_tokens tokens): no stop string matches yet, but a
        possible start of one is still held back. After a match, ``matched`` is set and every later
        call returns "".
        """
        if self.matched is not None:
            return ""
        if not self._stop:
            return text
        buf = self._held + text
        if not armed:
            hold = self._partial_suffix_len(buf)
            self._held = buf[len(buf) - hold :] if hold else ""
            return buf[: len(buf) - hold]
        # Earliest occurrence of any stop string (the longest one on a tie).
        best_idx, best = -1, None
        for s in self._stop:
            idx = buf.find(s)
            if idx != -1 and (best_idx == -1 or idx < best_idx or (idx == best_idx and len(s) > len(best))):
                best_idx, best = idx, s
        if best is not None:
            self.matched = best
            self._held = ""
            return buf[:best_idx]
        hold = self._partial_suffix_len(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """The held text, once the sequence ended without the stop string completing."""
        if self.matched is not None:
            return ""
        out, self._held = self._held, ""
        return out

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


class TextStream:
    """Detokenizer + stop strings for one choice: ``push`` tokens, get the text to emit."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_token_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        min_tokens: int = 0,
    ) -> None:
        self.detok = IncrementalDetokenizer(decode, prompt_token_ids)
        self.stops = StopStringMatcher(stop)
        self.min_tokens = min_tokens

    @property
    def stopped(self) -> bool:
        """True once a stop string matched: the caller must finish the choice with "stop"."""
        return self.stops.matched is not None

    def push(self, token_ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        text = self.detok.push(token_ids)
        return self.stops.feed(text, armed=self.detok.num_generated > self.min_tokens)

    def finish(self) -> str:
        """Text still held at the end of the sequence (held characters, an unfinished stop prefix)."""
        if self.stopped:
            return ""
        text = self.stops.feed(self.detok.flush(), armed=self.detok.num_generated > self.min_tokens)
        if self.stopped:
            return text
        return text + self.stops.flush()
