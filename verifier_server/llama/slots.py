"""What the llama.cpp runner holds per session, and the table that maps sessions onto KV sequences."""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class SequenceState:
    """The runner's view of one session's KV state.

    ``held`` is the one record of what the slot holds: position i holds ``held[i]``. A round
    evaluates from the longest common prefix of ``held`` and the session's tokens, so rejected
    candidates, a lost slot or a failed pass all come down to a shorter ``held``.
    """

    key: str
    slot: int | None = None
    held: list[int] = field(default_factory=list)
    ran: bool = False  # a job of it has completed: a later empty ``held`` means its state was lost
    # Parked in host memory after losing its slot: the saved state (pending or done) and the ids it
    # covers. Without it (over the budget) the session is rebuilt from its ids.
    parked: asyncio.Future[bytes] | None = None
    parked_held: list[int] = field(default_factory=list)
    parked_bytes: int = 0
    inflight: asyncio.Future | None = None  # the job writing to the slot, until it settles
    pins: int = 0  # rounds between taking the slot and queueing their job
    last_used: float = field(default_factory=time.monotonic)
    released: bool = False  # the session is gone; freed once nothing writes to the slot

    @property
    def busy(self) -> bool:
        """Whether the slot may be written to: such a sequence is never evicted."""
        return self.pins > 0 or (self.inflight is not None and not self.inflight.done())


class SlotTable:
    """Assigns the backend's KV sequences to sessions; the least recently used idle session gives
    up its slot when all are taken. ``on_evict(sequence, slot)`` runs first, to park its state."""

    def __init__(self, n_slots: int, on_evict: Callable[[SequenceState, int], None]) -> None:
        self.on_evict = on_evict
        self._free = list(range(n_slots - 1, -1, -1))
        self._owners: OrderedDict[int, SequenceState] = OrderedDict()  # slot -> owner, LRU first

    def acquire(self, seq: SequenceState) -> int | None:
        """A slot for ``seq`` (moved to most recently used); None if every slot is busy."""
        if seq.slot is not None:
            self._owners.move_to_end(seq.slot)
            return seq.slot
        if not self._free:
            victim = next((o for o in self._owners.values() if not o.busy), None)
            if victim is None:
                return None
            assert victim.slot is not None
            self.on_evict(victim, victim.slot)
            self.release(victim)
        seq.slot = self._free.pop()
        seq.held = []
        self._owners[seq.slot] = seq
        return seq.slot

    def release(self, seq: SequenceState) -> None:
        if seq.slot is not None:
            del self._owners[seq.slot]
            self._free.append(seq.slot)
            seq.slot = None
            seq.held = []

    @property
    def in_use(self) -> int:
        return len(self._owners)
