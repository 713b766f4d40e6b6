"""Generated ids -> text on the screen, one token at a time.

- Byte-fallback pieces are joined as bytes and decoded with an incremental UTF-8 decoder, so a
  character split over several tokens is shown only once it is complete.
- The concatenation of everything emitted equals `Tokenizer.decode` of the same ids (up to the
  stop), including the slow tokenizer's removal of the first piece's leading space.
- Stops on `<|im_end|>` and eos (Tokenizer.stop_ids, P8) and on any stop string. Text that could
  be the beginning of a stop string is held back until it is clear, so a stop string split over
  tokens is never printed; text after it is dropped. Stop strings are matched in the answer's
  text as the user sees it, unlike transformers' StopStringCriteria, which also matches in the
  prompt's tail and in the raw first piece (" the" stops there on a leading "▁the"; here the
  answer starts "the", as printed).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from .tokenizer import UTF8_ERRORS, Tokenizer


class StreamDecoder:
    """Feed generated ids with `push`; print what it returns; call `finish` at the end."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop_strings: Iterable[str] = (),
        stop_ids: Iterable[int] | None = None,
    ):
        self._tokenizer = tokenizer
        self._stop_strings = tuple(s for s in stop_strings if s)
        self._stop_ids = frozenset(tokenizer.stop_ids if stop_ids is None else stop_ids)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=UTF8_ERRORS)
        self._first = True
        self._pending = ""  # decoded but held back (might start a stop string)
        self.text = ""  # everything emitted so far
        self.stopped = False
        self.stop_reason: str | None = None  # "stop_id" or "stop_string"
        self.stop_token: int | str | None = None  # the id or string that stopped it

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that can now be shown ('' if none)."""
        if self.stopped:
            return ""
        token_id = int(token_id)
        if token_id in self._stop_ids:
            self.stopped, self.stop_reason, self.stop_token = True, "stop_id", token_id
            return self._flush()
        if self._tokenizer.ends_byte_run(token_id):
            self._pending += self._utf8.decode(b"", final=True)
        piece = self._tokenizer.piece_bytes(token_id, first=self._first)
        self._first = self._first and token_id == self._tokenizer.unk_id
        self._pending += self._utf8.decode(piece)
        return self._emit_safe()

    def feed(self, ids: Iterable[int]) -> str:
        """Push several ids; return the text they released."""
        return "".join(self.push(i) for i in ids)

    def finish(self) -> str:
        """End of generation: release what was held back (an incomplete character shows as U+FFFD)."""
        if self.stopped:
            return ""
        self.stopped = True
        return self._flush()

    def _flush(self) -> str:
        self._pending += self._utf8.decode(b"", final=True)
        return self._emit_safe(final=True)

    def _emit_safe(self, final: bool = False) -> str:
        text = self._pending
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped, self.stop_reason = True, "stop_string"
            text = text[:cut]
            self._pending = ""
        elif final:
            self._pending = ""
        else:
            keep = self._held_back(text)
            text, self._pending = text[: len(text) - keep], text[len(text) - keep :]
        self.text += text
        return text

    def _first_stop(self, text: str) -> int | None:
        hits = [(text.find(s), s) for s in self._stop_strings]
        hits = [(at, s) for at, s in hits if at >= 0]
        if not hits:
            return None
        at, self.stop_token = min(hits)
        return at

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that is the start of some stop string."""
        longest = 0
        for stop in self._stop_strings:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
