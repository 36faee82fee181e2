"""Per-session state on the verifier and the slot table that maps sessions onto KV sequences."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from shared.protocol import FinishReason, VerifyResponse
from shared.utf8 import complete_prefix_len


@dataclass
class Session:
    """A generation in progress. The verifier owns ``ids``: prompt plus every committed token.

    ``kv_len`` counts the leading ``ids`` whose keys and values sit in the session's slot; a
    session without a slot (new, or evicted) has ``kv_len == 0`` and is rebuilt from ``ids``.
    """

    prompt_len: int
    ids: list[int]
    max_tokens: int
    stop: list[bytes]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    text: bytearray = field(default_factory=bytearray)  # bytes of the generated ids
    sent: int = 0  # how many bytes of ``text`` were returned to the device
    round: int = 0
    last: VerifyResponse | None = None
    finish_reason: FinishReason | None = None
    slot: int | None = None
    kv_len: int = 0
    # Parked in host memory after losing its slot: the saved KV state (pending or done) and how
    # many ids it covers. Without it (over the budget) the session is rebuilt from ``ids``.
    parked: asyncio.Future | None = None
    parked_len: int = 0
    parked_bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Per draft position: [proposed, accepted] counts, for the draft-length hint.
    position_stats: list[list[int]] = field(default_factory=list)

    @property
    def generated(self) -> int:
        return len(self.ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def sendable_end(self) -> int:
        """How far ``text`` may be returned: whole UTF-8 characters only, and never the start of
        what could still turn out to be a stop string (unless the session has finished)."""
        if self.finished:
            return len(self.text)
        end = complete_prefix_len(self.text)
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

    def touch(self) -> None:
        self.last_used = time.monotonic()


class SlotTable:
    """Assigns the backend's KV sequences to sessions; the least recently used idle session gives
    up its slot when all are taken. ``on_evict(session, slot)`` runs first, to park its state."""

    def __init__(self, n_slots: int, on_evict: Callable[[Session, int], None]) -> None:
        self.on_evict = on_evict
        self._free = list(range(n_slots - 1, -1, -1))
        self._owners: OrderedDict[int, Session] = OrderedDict()  # slot -> session, LRU first

    def acquire(self, s: Session) -> int | None:
        """A slot for ``s`` (moved to most recently used); None if every slot is busy in a round."""
        if s.slot is not None:
            self._owners.move_to_end(s.slot)
            return s.slot
        if not self._free:
            victim = next((o for o in self._owners.values() if not o.lock.locked()), None)
            if victim is None:
                return None
            assert victim.slot is not None
            self.on_evict(victim, victim.slot)
            self.release(victim)
        s.slot = self._free.pop()
        s.kv_len = 0
        self._owners[s.slot] = s
        return s.slot

    def release(self, s: Session) -> None:
        if s.slot is not None:
            del self._owners[s.slot]
            self._free.append(s.slot)
            s.slot = None
            s.kv_len = 0

    @property
    def in_use(self) -> int:
        return len(self._owners)
