"""Token ids to text one token at a time, without decoding the whole answer again at every token.

TGI's `decode_token` (server/text_generation_server/models/model.py): keep two offsets into the sequence's
ids. `read` is where the text shown so far ends; `prefix` is where the window decoded with it starts, one
emission earlier. Each new token decodes `ids[prefix:read]` and `ids[prefix:]`; the new text is what the
second adds to the first. Decoding a short window, not the token alone, keeps whatever a token's text owes
to its left neighbour (SentencePiece's leading spaces, one character spread over several byte tokens).
When the window ends in U+FFFD it stops inside a character: nothing is shown until a later token ends it.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"  # what decoding makes of the bytes of an unfinished UTF-8 character


class IncrementalDetokenizer:
    """One sequence's generated ids -> the text each new id adds (special tokens skipped)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes ("" while a character is still unfinished)."""
        self._ids.append(token_id)
        shown, window = self._decode_window()
        if len(window) > len(shown) and not window.endswith(REPLACEMENT_CHARACTER):
            self._prefix, self._read = self._read, len(self._ids)
            return window[len(shown) :]
        return ""

    def flush(self) -> str:
        """The sequence ends: return the text not shown yet, an unfinished character included."""
        shown, window = self._decode_window()
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(shown) :]

    def _decode_window(self) -> tuple[str, str]:
        """(the window's text already shown, the whole window's text)."""
        decode = self._tokenizer.decode
        return (
            decode(self._ids[self._prefix : self._read], skip_special_tokens=True),
            decode(self._ids[self._prefix :], skip_special_tokens=True),
        )
