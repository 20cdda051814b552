"""When one sequence stops, as TGI's StoppingCriteria decides it: an end token, a stop string, max_new_tokens,
the end of the context, or the request's deadline. No torch here.

Stop strings are matched on text, so this also decides how much of the text may be shown yet: a tail that
could be the beginning of a stop string is held back until the next text settles it, so a stop string never
reaches a stream, not even in part.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from serve.generation import EOS, LENGTH, TIMEOUT


class StoppingCriteria:
    def __init__(
        self,
        *,
        eos_token_ids: Collection[int],
        max_new_tokens: int,
        context_room: int,
        deadline: float,
        stop: Sequence[str] = (),
    ) -> None:
        self.eos_token_ids = eos_token_ids
        # Generated tokens allowed: what the request asked for, within what the context has left.
        self.max_tokens = min(max_new_tokens, context_room)
        self.deadline = deadline
        self.stop = tuple(stop)
        self._held = ""  # text that may be the start of a stop string, not shown yet

    def limit(self, token_id: int, generated: int, now: float, deadline_cap: float = float("inf")) -> str | None:
        """The finish reason this token brings without looking at text (eos, then length, then timeout)."""
        if token_id in self.eos_token_ids:
            return EOS
        if generated >= self.max_tokens:
            return LENGTH
        if now >= min(self.deadline, deadline_cap):
            return TIMEOUT
        return None

    def release(self, text: str, *, final: bool) -> tuple[str, bool]:
        """Take the sequence's next text; return (what can be shown now, whether a stop string ended it).

        On a stop string the answer ends just before it. `final` (the sequence ends for another reason)
        releases what was held back. Stop strings are tried in the caller's order.
        """
        text = self._held + text
        self._held = ""
        for stop in self.stop:
            # Everything already shown was checked, and a stop string cannot begin in it (its start would
            # have been held back), so the text held plus the new text is all there is to search.
            at = text.find(stop)
            if at != -1:
                return text[:at], True
        if final:
            return text, False
        keep = _partial_stop_at_end(text, self.stop)
        if keep:
            text, self._held = text[:-keep], text[-keep:]
        return text, False


def _partial_stop_at_end(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that is the beginning of a stop string (0 if none)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
