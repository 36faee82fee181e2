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
from verifier_server.stops import StopMatcher


@dataclass
class Session:
    """A generation in progress. The verifier owns ``ids``: prompt plus every committed token."""

    prompt_len: int
    ids: list[int]
    max_tokens: int
    stops: StopMatcher
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    owner: str = ANONYMOUS  # the device that created it: the only one that may use it
    idempotency_key: str | None = None
    text: bytearray = field(default_factory=bytearray)  # bytes of the generated ids
    sent: int = 0  # how many bytes of ``text`` were returned to the device
    round: int = 0
    # The last answers, replayed to a retry of their round: a device may have sent up to
    # MAX_CHAINED chained rounds behind one whose answer it lost.
    answers: deque[VerifyResponse] = field(default_factory=lambda: deque(maxlen=MAX_CHAINED + 1))
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
        return min(end, len(self.text) - self.stops.pending())

    def replay(self, round_no: int) -> VerifyResponse | None:
        """The answer already given to round ``round_no``, if it is among the last ones."""
        return next((a for a in self.answers if a.round == round_no), None)

    def answered_text(self, rounds: int) -> bytes | None:
        """The text of the answers to the last ``rounds`` rounds (None: not that many yet)."""
        if rounds > len(self.answer_starts):
            return None
        return bytes(self.text[self.answer_starts[-rounds] : self.sent])

    def touch(self) -> None:
        self.last_used = time.monotonic()
