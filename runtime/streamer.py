"""A reply's text as its blocks commit: the one place where tokens become streamed text.

dg-run, dg-serve, `Chat` and the text API all stream through `TextStreamer`, so that every front end cuts and
holds back text the same way.
"""

from collections.abc import Sequence

import numpy as np

from .text import TextCodec

PARTIAL = "\ufffd"  # what a tokenizer decodes a character's first bytes to, until its other bytes arrive


class TextStreamer:
    """Feed it each committed block; it returns the text that became final.

    The reply ends at the first EOS (or pad), at `max_tokens` and at the first stop string (which is not part of
    the text). Until the reply has ended, two things at its end are held back: a partial UTF-8 character (a
    byte-fallback tokenizer splits one character into several tokens, which two blocks may share) and a tail that
    could be the start of a stop string. `finish` releases them (all but a character the reply's end cut off)."""

    def __init__(self, codec: TextCodec, eos_ids: Sequence[int], pad_id: int | None, max_tokens: int,
                 stop: Sequence[str] = ()):
        self.codec, self.eos_ids, self.pad_id = codec, list(eos_ids), pad_id
        self.max_tokens, self.stop = max_tokens, list(stop)
        self.generated: list[int] = []
        self.tokens = np.zeros(0, dtype=np.int64)  # the reply's tokens (before EOS, within max_tokens)
        self.text = ""  # the text returned so far
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" once the reply ended
        self.stop_string_hit = False

    @property
    def ended(self) -> bool:
        return self.finish_reason is not None

    def add(self, block: np.ndarray) -> str:
        """Take a committed block ([canvas] token ids); return the text that is now final."""
        if self.ended:
            return ""
        self.generated += np.asarray(block).tolist()
        kept = np.array(self.generated[: self.max_tokens], dtype=np.int64)
        self.tokens = reply_tokens(kept, self.eos_ids, self.pad_id)
        if len(self.tokens) < len(kept):
            self.finish_reason = "stop"
        elif len(self.generated) >= self.max_tokens:
            self.finish_reason = "length"
        return self._release(self.codec.decode(self.tokens))

    def finish(self) -> str:
        """The generation is over (Done, or cut short): release what was held back."""
        if self.finish_reason is None:
            self.finish_reason = "length"
        return self._release(self.codec.decode(self.tokens))

    def _release(self, text: str) -> str:
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.finish_reason, self.stop_string_hit = text[:cut], "stop", True
        if self.ended:  # a character cut off at the end can never be completed: it is not part of the text
            text = text.rstrip(PARTIAL)
        else:
            text = text[: len(text) - held_back(text, self.stop)]
        delta, self.text = text[len(self.text):], text
        return delta


def reply_tokens(tokens: np.ndarray, eos_ids: Sequence[int], pad_id: int | None) -> np.ndarray:
    """A row of generated tokens up to (not including) its first EOS or pad."""
    stop = np.flatnonzero(np.isin(tokens, eos_ids) | (tokens == pad_id))
    return tokens[: stop[0]] if len(stop) else tokens


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` may still change: a partial character, a stop string's start."""
    partial = len(text) - len(text.rstrip(PARTIAL))
    start_of_stop = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return max(partial, start_of_stop)
