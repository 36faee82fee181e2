"""The llama.cpp runner: verifies rounds of many sessions in shared forward passes.

It maps sessions onto the backend's KV sequences (``SlotTable``), evaluates each round from what
the slot already holds, parks the KV state of evicted sessions in host memory (bounded; beyond the
budget a session is rebuilt from its ids), and applies the round's acceptance rule on the scheduler
thread, right where the logits are.

Cancellation is safe by construction: a job changes a sequence's state only when it *settles*
(a callback on the job's future, whoever still waits for it), a sequence with a job in flight is
never evicted, and a withdrawn job never reaches a pass.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from shared.utf8 import common_prefix_len
from verifier_server.acceptance import Acceptance, AcceptanceRule, RowKind
from verifier_server.cost_curve import CostCurve, LoadModel, PassRecord, RoundCost
from verifier_server.llama.calibration import measure_cost_curve
from verifier_server.llama.forward import ForwardBackend
from verifier_server.llama.scheduler import Done, Scheduler
from verifier_server.llama.slots import SequenceState, SlotTable
from verifier_server.runner import RoundOutcome, RunnerError

CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32)


def _held_prefix(held: list[int], tokens: list[int]) -> int:
    """How many leading ``tokens`` the slot already holds (the usual case: all of ``held``)."""
    if tokens[: len(held)] == held:
        return len(held)
    return common_prefix_len(held, tokens)


class LlamaRunner:
    name = "llama.cpp"
    row_kinds = frozenset({RowKind.TOP, RowKind.FULL})  # dense rows serve every rule

    def __init__(
        self,
        backend: ForwardBackend,
        token_budget: int = 512,
        wait_window_s: float = 0.002,
        max_parked_bytes: int = 1 << 30,
        calibration_sizes: tuple[int, ...] = CALIBRATION_SIZES,
    ) -> None:
        self.backend = backend
        self.model_name = backend.model_name
        self.tokenizer = backend.tokenizer
        self.sequence_slots = backend.n_slots
        self.max_context_tokens = backend.ctx_per_slot
        self.max_parked_bytes = max_parked_bytes
        # Calibrate before the scheduler owns the backend: the start-up cost curve of the hint.
        self.load = LoadModel(CostCurve(measure_cost_curve(backend, calibration_sizes)))
        self.scheduler = Scheduler(backend, token_budget, wait_window_s)
        self.slots = SlotTable(backend.n_slots, on_evict=self._park)
        # Sessions waiting for a slot while every slot is mid-round: served first come, first
        # served, so that none starves behind newcomers when sessions outnumber slots.
        self._slot_waiters: deque[tuple[SequenceState, asyncio.Future[int]]] = deque()
        self._seqs: dict[str, SequenceState] = {}
        self.parked_bytes = 0
        self.evictions = 0  # sessions that lost their slot to another
        self.rebuilds = 0  # rounds that re-evaluated a session whose KV state was dropped

    # --- the Runner interface -------------------------------------------------------------------
    async def prefill(self, key: str, ids: Sequence[int]) -> None:
        """Evaluate everything but the last committed id (the first round evaluates it)."""
        if len(ids) > 1:
            await self._run(key, list(ids[:-1]), 0, None)

    async def verify(
        self, key: str, ids: Sequence[int], candidates: Sequence[int], rule: AcceptanceRule
    ) -> RoundOutcome:
        cands = list(candidates)
        done = await self._run(key, list(ids) + cands, len(cands) + 1, partial(rule.accept, cands))
        acceptance: Acceptance = done.value
        return RoundOutcome(acceptance.accepted, acceptance.token, done.queue_s, done.model_s, done.reduce_s)

    def release(self, key: str) -> None:
        seq = self._seqs.pop(key, None)
        if seq is not None:
            seq.released = True
            self._drop_if_released(seq)

    def expect_rounds(self, n: int) -> None:
        self.scheduler.expect(n)

    def round_cost(self) -> RoundCost:
        self.load.update(self.scheduler.take_passes())
        return self.load.round_cost()

    def stats(self) -> dict[str, Any]:
        st = self.scheduler.stats()
        return {
            "slots_in_use": self.slots.in_use,
            "parked_sessions": sum(1 for x in self._seqs.values() if x.parked is not None),
            "parked_bytes": self.parked_bytes,
            "forward_passes": st.forward_passes,
            "positions": st.positions,
            "busy_s": st.busy_s,
            "cost_curve_s": self.load.curve.as_dict(),
            "batch_sizes": {str(b): c for b, c in sorted(st.batch_sizes.items())},
            "queued_jobs": st.queued_jobs,
            "slot_waiters": sum(1 for _, turn in self._slot_waiters if not turn.done()),  # every slot mid-round
            "evictions": self.evictions,
            "rebuilds": self.rebuilds,
        }

    def add_pass_listener(self, listener: Callable[[PassRecord], None]) -> None:
        self.scheduler.pass_listeners.append(listener)

    def close(self) -> None:
        self.scheduler.close()
        self.backend.close()

    # --- rounds ---------------------------------------------------------------------------------
    async def _run(self, key: str, tokens: list[int], n_logits: int, reduce: Any) -> Done:
        """Evaluate ``tokens`` (the session's full sequence) from what its slot already holds."""
        seq = self._seqs.get(key)
        if seq is None:
            seq = self._seqs[key] = SequenceState(key)
        seq.last_used = time.monotonic()
        if seq.inflight is not None and not seq.inflight.done():
            await asyncio.wait([seq.inflight])  # the job of a cancelled round is still in a pass
        seq.pins += 1
        try:
            slot = await self._acquire(seq)
        finally:
            seq.pins -= 1
            self._drop_if_released(seq)  # no job is queued yet: a released session frees now
        if seq.released:
            raise RunnerError(f"session '{key}' was released during its round")
        if seq.ran and not seq.held:  # its KV state was dropped (evicted unparked, a failed pass)
            self.rebuilds += 1
        start = min(_held_prefix(seq.held, tokens), len(tokens) - max(n_logits, 1))
        job = self.scheduler.submit(slot, start, tokens[start:], n_logits, reduce)
        seq.held = tokens[:start]  # what lies beyond is known once the job settles
        seq.inflight = job.future
        job.future.add_done_callback(partial(self._settled, seq, tokens))
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self.scheduler.withdraw(job)  # if a pass has it already, it settles by itself
            raise

    def _settled(self, seq: SequenceState, tokens: list[int], fut: asyncio.Future) -> None:
        """A job finished, whoever still waits for it: record what the slot holds now."""
        if fut.cancelled():
            pass  # withdrawn before its pass: the slot holds ``held`` (a chunk beyond is rolled back)
        elif fut.exception() is not None:
            seq.held = []  # the pass failed: the slot's state is unknown, rebuild it
        else:
            seq.held = tokens  # rejected candidates included: the next round's prefix drops them
            seq.ran = True
        self._drop_if_released(seq)
        self._grant_slots()  # its slot may be given to a waiting session now

    async def _acquire(self, seq: SequenceState) -> int:
        """A slot for ``seq``, its parked state restored into it if it has one."""
        slot = self.slots.acquire(seq) if seq.slot is not None or not self._slot_waiters else None
        if slot is None:  # every slot is mid-round, or others wait already: wait in line
            turn = asyncio.get_running_loop().create_future()
            self._slot_waiters.append((seq, turn))
            self._grant_slots()
            slot = await turn  # a cancelled wait cancels ``turn``: the line skips it
        if seq.parked is not None:
            held = seq.parked_held
            await asyncio.wait([seq.parked])
            state = self._unpark(seq)
            if state is not None:
                await self.scheduler.call(partial(self.backend.load_state, slot, state))
                seq.held = held
        return slot

    # --- parking --------------------------------------------------------------------------------
    def _park(self, seq: SequenceState, slot: int) -> None:
        """Save an evicted session's KV state to host memory; queued before the slot's new owner
        writes to it, so the copy is exact. Over the budget, the least recently used parked
        sessions are dropped instead (they are rebuilt from their ids when they return)."""
        self.evictions += 1
        if not seq.held or seq.released or self.max_parked_bytes <= 0:
            return
        fut = self.scheduler.call(partial(self.backend.save_state, slot))
        seq.parked, seq.parked_held = fut, seq.held

        def saved(fut: asyncio.Future) -> None:
            if fut.cancelled() or fut.exception() is not None or seq.parked is not fut:
                return
            seq.parked_bytes = len(fut.result())
            self.parked_bytes += seq.parked_bytes
            parked = sorted((x for x in self._seqs.values() if x.parked is not None and x.parked.done()),
                            key=lambda x: x.last_used)
            for old in parked:
                if self.parked_bytes <= self.max_parked_bytes:
                    break
                self._unpark(old)

        fut.add_done_callback(saved)

    def _unpark(self, seq: SequenceState) -> bytes | None:
        """Take a session's parked state out of host memory (None if it has none)."""
        fut, seq.parked, seq.parked_held = seq.parked, None, []
        self.parked_bytes -= seq.parked_bytes  # counted once the save completed, whatever came first
        seq.parked_bytes = 0
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
            return None
        return fut.result()

    def _drop_if_released(self, seq: SequenceState) -> None:
        """Free a released session's slot and parked state once nothing writes to the slot."""
        if seq.released and not seq.busy:
            self.slots.release(seq)
            self._unpark(seq)
            self._grant_slots()

    def _grant_slots(self) -> None:
        """Give slots to waiting sessions in arrival order, while any slot can be had."""
        while self._slot_waiters:
            seq, turn = self._slot_waiters[0]
            if turn.done():  # its round was cancelled
                self._slot_waiters.popleft()
                continue
            slot = self.slots.acquire(seq)
            if slot is None:
                return
            self._slot_waiters.popleft()
            turn.set_result(slot)
