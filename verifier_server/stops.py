"""Stop strings over a session's growing text, in time linear in the text.

Each committed byte advances one Knuth-Morris-Pratt automaton per stop string. The automaton's
state after the last byte is the longest suffix of the text that is a prefix of its stop string,
which gives both answers the engine needs without rescanning:

- where a stop string first occurs (the generation ends there), and
- how much of the text's tail could still grow into a stop string, and so must be held back
  from the device until the next bytes decide.

The old hold-back compared every suffix of the text with every stop's prefixes, every round:
quadratic in the stops' length (16 stops of 64 KiB at 8 KB of text blocked the loop ~70 ms a round).
"""
from __future__ import annotations


def _failure(pattern: bytes) -> list[int]:
    """KMP's failure function: for each prefix length, the longest proper border's length."""
    fail = [0] * (len(pattern) + 1)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i + 1] = k
    return fail


class StopMatcher:
    """Feeds on the text as it is committed; ``stops`` are non-empty byte strings."""

    def __init__(self, stops: list[bytes]) -> None:
        self.stops = stops
        self._fail = [_failure(s) for s in stops]
        self._state = [0] * len(stops)  # matched prefix length of each stop at the text's end
        self.fed = 0  # bytes fed so far

    def feed(self, data: bytes) -> int | None:
        """Append ``data`` to the text; the index in the whole text where the earliest stop string
        completed within it begins (None: none did)."""
        first: int | None = None
        for j, (stop, fail) in enumerate(zip(self.stops, self._fail)):
            k = self._state[j]
            for i, byte in enumerate(data):
                if k == len(stop):  # a full match before: continue from its border
                    k = fail[k]
                while k and byte != stop[k]:
                    k = fail[k]
                if byte == stop[k]:
                    k += 1
                if k == len(stop):
                    start = self.fed + i + 1 - k
                    first = start if first is None else min(first, start)
            self._state[j] = k
        self.fed += len(data)
        return first

    def pending(self) -> int:
        """How many bytes at the text's end are the beginning of a stop string, which the bytes
        still to come could complete: the longest suffix that is a proper prefix of a stop."""
        return max((k if k < len(stop) else fail[k] for k, stop, fail in zip(self._state, self.stops, self._fail)),
                   default=0)
