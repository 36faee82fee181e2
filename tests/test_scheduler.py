"""The scheduler's batching policy and its robustness, with a fake backend (ordering and hand-over
logic only, no model involved).

Nothing here waits for time to pass: the wait window runs on a ``Clock`` the test moves, and a
``Gate`` holds a forward pass and says when one is held, so every interleaving is the one the test
names, on a loaded machine as on an idle one."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from verifier_server.llama.forward import ForwardItem
from verifier_server.llama.scheduler import Scheduler
from verifier_server.runner import RunnerError

HELD_S = 10.0  # the longest a test waits for the worker to reach a point: a failure, never a pace


async def _until(cv: threading.Condition, predicate, what: str) -> None:
    """Wait, off the event loop, until ``predicate`` holds under ``cv`` (notified by the worker)."""
    def wait() -> bool:
        with cv:
            return cv.wait_for(predicate, HELD_S)

    assert await asyncio.to_thread(wait), f"the worker never {what}"


class Gate:
    """Holds forward passes while closed and records each pass it holds, so that a test waits for
    "a pass is held now" instead of sleeping and hoping the worker got there."""

    def __init__(self, closed: bool = False) -> None:
        self._open = threading.Event()
        if not closed:
            self._open.set()
        self._cv = threading.Condition()
        self.held: list[list[int]] = []  # the slots of every pass held so far

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def enter(self, items: list[ForwardItem]) -> None:
        """The backend's first step in a pass: wait here while the gate is closed."""
        if not self._open.is_set():
            with self._cv:
                self.held.append([it.slot for it in items])
                self._cv.notify_all()
        if not self._open.wait(HELD_S):
            raise TimeoutError("the gate was never opened")

    async def holding(self, n: int = 1) -> list[int]:
        """Wait until the gate has held ``n`` passes (it holds the last now); that pass's slots."""
        await _until(self._cv, lambda: len(self.held) >= n, f"brought {n} passes to the gate")
        return self.held[n - 1]


class Clock:
    """The wait window's clock, moved by the test. It counts the worker's readings: the worker
    reads it when it starts gathering rounds for a pass and each time it looks again, so a test
    can wait until the worker is gathering (or has looked again after the clock moved)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0
        self._cv = threading.Condition()

    def __call__(self) -> float:
        with self._cv:
            self.reads += 1
            self._cv.notify_all()
            return self.now

    def advance(self, seconds: float) -> None:
        with self._cv:
            self.now += seconds

    async def read(self, times: int) -> None:
        """Wait until the worker has read the clock ``times`` times in all."""
        await _until(self._cv, lambda: self.reads >= times, f"read the clock {times} times")


class RecordingBackend:
    """Records the items of every forward pass and returns logits that encode (slot, position);
    its ``gate`` (open unless closed) can hold a pass."""

    n_vocab = 4

    def __init__(self, gate: Gate | None = None) -> None:
        self.passes: list[list[ForwardItem]] = []
        self.gate = gate or Gate()

    def forward(self, items):
        self.gate.enter(items)
        self.passes.append(list(items))
        out = []
        for it in items:
            rows = np.zeros((it.n_logits, self.n_vocab), dtype=np.float32)
            for j in range(it.n_logits):
                rows[j, 0] = it.slot
                rows[j, 1] = it.pos + len(it.tokens) - it.n_logits + j
            out.append(rows)
        return out


def copy_rows(rows):
    return np.array([rows[i] for i in range(len(rows))])


async def forward(sched: Scheduler, slot: int, pos: int, tokens: list[int], n_logits: int):
    """Submit a job whose reduce copies its rows, and await them."""
    done = await sched.submit(slot, pos, tokens, n_logits, copy_rows).future
    return done.value


def test_concurrent_rounds_share_one_forward_pass():
    backend, clock = RecordingBackend(), Clock()
    sched = Scheduler(backend, token_budget=64, wait_window_s=0.5, clock=clock)
    sched.expect(4)  # four sessions are generating: their rounds should meet

    async def main():
        first = asyncio.create_task(forward(sched, 0, 10, [1, 2, 3], 3))
        await clock.read(2)  # the worker set its deadline and looked again: it waits for the others
        rest = asyncio.gather(*(forward(sched, s, 10, [1, 2, 3], 3) for s in range(1, 4)))
        return [await first, *await rest]

    results = asyncio.run(main())
    sched.close()
    assert len(backend.passes) == 1 and len(backend.passes[0]) == 4
    for slot, logits in enumerate(results):
        assert logits[:, 0].tolist() == [slot] * 3
        assert logits[:, 1].tolist() == [10, 11, 12]


def test_a_pass_waits_for_expected_rounds_until_the_window_ends_and_no_longer():
    backend, clock = RecordingBackend(), Clock()
    sched = Scheduler(backend, token_budget=64, wait_window_s=0.05, clock=clock)
    sched.expect(3)  # but only one round comes

    async def main():
        job = sched.submit(0, 0, [1], 1, copy_rows)
        await clock.read(2)  # gathering: its deadline is 0.05
        clock.advance(0.04)
        await clock.read(clock.reads + 2)  # it looked at 0.04 and went back to waiting, then looked again
        passes_within_the_window = len(backend.passes)
        clock.advance(0.02)  # the window is over: the round goes alone
        await asyncio.wait_for(job.future, HELD_S)
        return passes_within_the_window

    passes_within_the_window = asyncio.run(main())
    sched.close()
    assert passes_within_the_window == 0
    assert [[it.slot for it in p] for p in backend.passes] == [[0]]


def test_long_prefill_is_chunked_and_does_not_stall_other_rounds():
    backend = RecordingBackend(Gate(closed=True))
    sched = Scheduler(backend, token_budget=16, wait_window_s=0.0)

    async def main():
        prefill = asyncio.create_task(forward(sched, 0, 0, list(range(40)), 1))
        assert await backend.gate.holding() == [0]  # the prompt's first chunk, alone
        rounds = [sched.submit(s, 5, [7, 8], 2, copy_rows) for s in (1, 2)]  # queued behind it
        backend.gate.open()
        return await prefill, [(await r.future).value for r in rounds]

    prefill, rounds = asyncio.run(main())
    sched.close()
    assert all(sum(len(it.tokens) for it in p) <= 16 for p in backend.passes)
    chunks = [it for p in backend.passes for it in p if it.slot == 0]
    assert [it.pos for it in chunks] == sorted(it.pos for it in chunks) and chunks[0].pos == 0
    assert sum(len(it.tokens) for it in chunks) == 40
    assert prefill[:, 1].tolist() == [39]  # logits of the last prompt token only
    # the short rounds were answered before the prefill finished
    round_pass = next(i for i, p in enumerate(backend.passes) if any(it.slot == 1 for it in p))
    last_prefill_pass = max(i for i, p in enumerate(backend.passes) if any(it.slot == 0 for it in p))
    assert round_pass < last_prefill_pass
    assert [r[:, 1].tolist() for r in rounds] == [[5, 6], [5, 6]]


def test_a_pass_never_holds_two_jobs_of_one_slot():
    backend, clock = RecordingBackend(), Clock()
    sched = Scheduler(backend, token_budget=64, wait_window_s=0.05, clock=clock)
    sched.expect(3)  # the clock stands still: the first pass waits until all three are queued

    async def main():
        first, second, other = (sched.submit(0, 0, [1, 2], 1, copy_rows), sched.submit(0, 2, [3], 1, copy_rows),
                                sched.submit(1, 0, [4], 1, copy_rows))
        await asyncio.gather(first.future, other.future)
        clock.advance(1.0)  # no third round is coming: slot 0's second job goes on its own
        await asyncio.wait_for(second.future, HELD_S)

    asyncio.run(main())
    sched.close()
    for p in backend.passes:
        slots = [it.slot for it in p]
        assert len(slots) == len(set(slots)), backend.passes
    assert len(backend.passes) == 2


def test_a_failed_pass_fails_its_rounds_and_the_worker_carries_on():
    class Flaky(RecordingBackend):
        def forward(self, items):
            if not self.passes:
                self.passes.append(list(items))
                raise MemoryError("decode failed")
            return super().forward(items)

    backend = Flaky()
    sched = Scheduler(backend, token_budget=8, wait_window_s=0.0)

    async def main():
        with pytest.raises(RunnerError, match="decode failed"):
            await forward(sched, 0, 0, [1], 1)
        return await forward(sched, 1, 0, [1], 1)

    second = asyncio.run(main())
    sched.close()
    assert second.shape == (1, 4)


def test_a_failing_rule_fails_only_its_round():
    backend = RecordingBackend()
    sched = Scheduler(backend, token_budget=16, wait_window_s=0.2)
    sched.expect(2)

    def broken(rows):
        raise IndexError("row out of range")

    async def main():
        bad = sched.submit(0, 0, [1], 1, broken).future
        good = sched.submit(1, 0, [1], 1, copy_rows).future
        results = await asyncio.gather(bad, good, return_exceptions=True)
        return results

    bad, good = asyncio.run(main())
    sched.close()
    assert isinstance(bad, RunnerError) and "row out of range" in str(bad)
    assert good.value.shape == (1, 4)


def test_the_worker_survives_an_event_loop_that_closed_before_its_answer():
    backend = RecordingBackend(Gate(closed=True))
    sched = Scheduler(backend, token_budget=8, wait_window_s=0.0)

    async def leave_early():
        sched.submit(0, 0, [1], 1, copy_rows)  # nobody awaits it; its loop closes first

    asyncio.run(leave_early())
    backend.gate.open()
    logits = asyncio.run(forward(sched, 1, 0, [1], 1))
    sched.close()
    assert logits[:, 0].tolist() == [1]


def test_a_withdrawn_job_never_reaches_a_pass():
    backend = RecordingBackend(Gate(closed=True))
    sched = Scheduler(backend, token_budget=8, wait_window_s=0.0)

    async def main():
        running = sched.submit(0, 0, [1], 1, copy_rows)
        assert await backend.gate.holding() == [0]  # taken into a pass, held in the backend
        queued = sched.submit(1, 0, [9, 9], 1, copy_rows)
        assert sched.withdraw(queued) and queued.future.cancelled()
        assert not sched.withdraw(running)  # in a pass already: it completes
        backend.gate.open()
        return await running.future

    asyncio.run(main())
    sched.close()
    assert [it.slot for p in backend.passes for it in p] == [0]


def test_calls_run_between_passes_in_submission_order():
    backend = RecordingBackend()
    sched = Scheduler(backend, token_budget=8, wait_window_s=0.0)
    events = []

    async def main():
        saved = sched.call(lambda: events.append(("save", len(backend.passes))) or b"state")
        logits = await forward(sched, 0, 0, [1, 2], 1)  # the slot's new owner, queued after the save
        events.append(("forward", len(backend.passes)))
        return await saved, logits

    state, _ = asyncio.run(main())
    sched.close()
    assert state == b"state"
    assert events == [("save", 0), ("forward", 1)]


def test_a_stopped_scheduler_refuses_work_instead_of_hanging():
    sched = Scheduler(RecordingBackend(), token_budget=8)
    sched.close()

    async def main():
        sched.submit(0, 0, [1], 1, None)

    with pytest.raises(RunnerError, match="stopped"):
        asyncio.run(main())
