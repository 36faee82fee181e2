"""A generation session as the engine sees it: committed ids and text, rounds, stop strings.

What backs a session in a model runtime (KV slots, parked state) belongs to the runner, keyed by
the session id.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from shared.protocol import MAX_CHAINED, FinishReason, VerifyResponse
from shared.sampling import GREEDY_SAMPLING, Sampling
from shared.utf8 import complete_prefix_len
from verifier_server.auth import ANONYMOUS
from verifier_server.draft_hint import AcceptanceHistory


@dataclass
class Session:
    """A generation in progress. The verifier owns ``ids``: prompt plus every committed token."""

    prompt_len: int
    ids: list[int]
    max_tokens: int
    stop: list[bytes]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    owner: str = ANONYMOUS  # the device that created it: the only one that may use it
    idempotency_key: str | None = None
    text: bytearray = field(default_factory=bytearray)  # bytes of the generated ids
    sent: int = 0  # how many bytes of ``text`` were returned to the device
    round: int = 0
    last: VerifyResponse | None = None
    # where the last rounds' answers begin in ``text`` (each ends where the next begins, the last at ``sent``)
    answer_starts: deque[int] = field(default_factory=lambda: deque(maxlen=MAX_CHAINED))
    finish_reason: FinishReason | None = None
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    history: AcceptanceHistory = field(default_factory=AcceptanceHistory)
    sampling: Sampling = GREEDY_SAMPLING
    seed: int = 0

    @property
    def generated(self) -> int:
        return len(self.ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sendable_end(self) -> int:
        """How far ``text`` may be returned: whole UTF-8 characters only, and never the start of
        what could still turn out to be a stop string. Once finished, a character left incomplete
        can never complete: it is dropped, so every answer stays valid UTF-8."""
        end = complete_prefix_len(self.text)
        if self.finished:
            return end
        for stop in self.stop:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if self.text[end - k : end] == stop[:k]:
                    end -= k
                    break
        return end

    def find_stop(self, search_from: int) -> int | None:
        """Earliest index in ``text`` where a stop string begins, searching from ``search_from``."""
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        return min(hits) if hits else None

    def answered_text(self, rounds: int) -> bytes | None:
        """The text of the answers to the last ``rounds`` rounds (None: not that many yet)."""
        if rounds > len(self.answer_starts):
            return None
        return bytes(self.text[self.answer_starts[-rounds] : self.sent])

    def touch(self) -> None:
        self.last_used = time.monotonic()
