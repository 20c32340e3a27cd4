"""Streaming detokenization: token ids in, safe-to-show text out.

Byte-level hold-back, as llama.cpp's server does it: the bytes of every token
(``Tokenizer.token_bytes``) are fed to an incremental UTF-8 decoder, so an
incomplete multi-byte character (a Chinese character arriving as three
``<0xE4><0xBD><0xA0>`` byte pieces, or a byte-level BPE split of an emoji) is
held back until it completes and never shows up as U+FFFD.  Invalid bytes
become U+FFFD once they can no longer start a valid character.

Stop strings are searched in decoded text only.  Text at the end that could
still grow into a stop string is held back until decided; a complete stop
string sets :attr:`IncrementalDecoder.stopped`, the text before it is
emitted and everything from it on is discarded.

With ``first_in_text=True`` the tokenizer's leading-space rule (sentencepiece
add_dummy_prefix) is applied, so ``"".join(pushes) + flush()`` equals
``tokenizer.decode(ids)`` exactly (when no stop string fires).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["IncrementalDecoder"]


class IncrementalDecoder:
    """Turns a stream of token ids into text, one ``push`` per token.

    Args:
        tokenizer: a ``runtime.tokenizer.Tokenizer`` (anything with
            ``token_bytes``; ``strips_leading_space``, ``strip_leading_space``
            and ``decode_errors`` are used when present).
        stop: stop strings; generation text ends before the first one.
        skip_special_tokens: drop special tokens (their bytes are b'').
        first_in_text: these tokens start the text, so the leading-space
            rule of ``decode`` applies to the first of them.
    """

    def __init__(
        self,
        tokenizer,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        first_in_text: bool = False,
    ) -> None:
        if isinstance(stop, str):
            stop = [stop]
        stops = []
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(f"stop strings must be str, got {type(s).__name__}: {s!r}")
            if s and s not in stops:
                stops.append(s)
        self._tok = tokenizer
        self._stops = stops
        self._skip = skip_special_tokens
        errors = getattr(tokenizer, "decode_errors", "replace")
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)
        self._at_start = bool(first_in_text and getattr(tokenizer, "strips_leading_space", False))
        self._held = ""  # decoded text that may be the start of a stop string
        self._parts: list[str] = []
        self.stopped = False
        self.stop_string: str | None = None

    # ------------------------------------------------------------------

    @property
    def text(self) -> str:
        """Everything emitted so far (by push and flush)."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def pending(self) -> bool:
        """Whether bytes or text are held back (flush() would emit something)."""
        return bool(self._held) or bool(self._utf8.getstate()[0])

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now safe to emit ('' if none)."""
        if self.stopped:
            return ""
        data = self._token_bytes(token_id)
        if not data:
            return ""
        if self._at_start:
            data, self._at_start = self._tok.strip_leading_space(token_id, data)
        return self._advance(self._utf8.decode(data, False), final=False)

    def push_many(self, token_ids: Sequence[int]) -> str:
        """push() each id in turn; return the concatenated output."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Emit everything held back (end of generation).

        An incomplete UTF-8 tail becomes U+FFFD here; a partial stop-string
        match is released as text.
        """
        if self.stopped:
            return ""
        return self._advance(self._utf8.decode(b"", True), final=True)

    # ------------------------------------------------------------------

    def _token_bytes(self, token_id: int) -> bytes:
        if self._skip:
            return self._tok.token_bytes(token_id)
        return self._tok.token_bytes(token_id, skip_special_tokens=False)

    def _advance(self, new: str, final: bool) -> str:
        held = self._held + new
        if not self._stops:
            out, self._held = held, ""
        else:
            cut = -1
            for s in self._stops:
                i = held.find(s)
                if i >= 0 and (cut < 0 or i < cut):
                    cut, self.stop_string = i, s
            if cut >= 0:
                out, self._held = held[:cut], ""
                self.stopped = True
            elif final:
                out, self._held = held, ""
            else:
                keep = self._partial_stop_len(held)
                out, self._held = held[: len(held) - keep], held[len(held) - keep :]
        if out:
            self._parts.append(out)
        return out

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
