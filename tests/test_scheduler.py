"""The scheduler's batching policy and its robustness, with a fake backend (ordering and hand-over
logic only, no model involved)."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from verifier_server.llama.forward import ForwardItem
from verifier_server.llama.scheduler import Scheduler
from verifier_server.runner import RunnerError


class RecordingBackend:
    """Records the items of every forward pass and returns logits that encode (slot, position)."""

    n_vocab = 4

    def __init__(self) -> None:
        self.passes: list[list[ForwardItem]] = []

    def forward(self, items):
        self.passes.append(list(items))
        out = []
        for it in items:
            rows = np.zeros((it.n_logits, self.n_vocab), dtype=np.float32)
            for j in range(it.n_logits):
                rows[j, 0] = it.slot
                rows[j, 1] = it.pos + len(it.tokens) - it.n_logits + j
            out.append(rows)
        return out


class GatedBackend(RecordingBackend):
    """Blocks in its forward pass until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def forward(self, items):
        self.gate.wait(5)
        return super().forward(items)


def copy_rows(rows):
    return np.array([rows[i] for i in range(len(rows))])


async def forward(sched: Scheduler, slot: int, pos: int, tokens: list[int], n_logits: int):
    """Submit a job whose reduce copies its rows, and await them."""
    done = await sched.submit(slot, pos, tokens, n_logits, copy_rows).future
    return done.value


def test_concurrent_rounds_share_one_forward_pass():
    backend = RecordingBackend()
    sched = Scheduler(backend, token_budget=64, wait_window_s=0.5)
    sched.expect(4)  # four sessions are generating: their rounds should meet

    async def main():
        first = asyncio.create_task(forward(sched, 0, 10, [1, 2, 3], 3))
        await asyncio.sleep(0.05)  # the others arrive a little later
        rest = asyncio.gather(*(forward(sched, s, 10, [1, 2, 3], 3) for s in range(1, 4)))
        return [await first, *await rest]

    results = asyncio.run(main())
    sched.close()
    assert len(backend.passes) == 1 and len(backend.passes[0]) == 4
    for slot, logits in enumerate(results):
        assert logits[:, 0].tolist() == [slot] * 3
        assert logits[:, 1].tolist() == [10, 11, 12]


def test_a_pass_waits_no_longer_than_the_window_for_expected_rounds():
    backend = RecordingBackend()
    sched = Scheduler(backend, token_budget=64, wait_window_s=0.05)
    sched.expect(3)  # but only one round comes

    async def main():
        t0 = asyncio.get_running_loop().time()
        await forward(sched, 0, 0, [1], 1)
        return asyncio.get_running_loop().time() - t0

    waited = asyncio.run(main())
    sched.close()
    assert len(backend.passes) == 1
    assert 0.04 < waited < 2.0


def test_long_prefill_is_chunked_and_does_not_stall_other_rounds():
    backend = RecordingBackend()
    sched = Scheduler(backend, token_budget=16, wait_window_s=0.05)
    sched.expect(3)

    async def main():
        prefill = asyncio.create_task(forward(sched, 0, 0, list(range(40)), 1))
        await asyncio.sleep(0.01)
        rounds = [asyncio.create_task(forward(sched, s, 5, [7, 8], 2)) for s in (1, 2)]
        return await prefill, await asyncio.gather(*rounds)

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
    backend = RecordingBackend()
    sched = Scheduler(backend, token_budget=64, wait_window_s=0.05)
    sched.expect(3)

    async def main():
        return await asyncio.gather(forward(sched, 0, 0, [1, 2], 1), forward(sched, 0, 2, [3], 1),
                                    forward(sched, 1, 0, [4], 1))

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
    backend = GatedBackend()
    sched = Scheduler(backend, token_budget=8, wait_window_s=0.0)

    async def leave_early():
        sched.submit(0, 0, [1], 1, copy_rows)  # nobody awaits it; its loop closes first

    asyncio.run(leave_early())
    backend.gate.set()
    logits = asyncio.run(forward(sched, 1, 0, [1], 1))
    sched.close()
    assert logits[:, 0].tolist() == [1]


def test_a_withdrawn_job_never_reaches_a_pass():
    backend = GatedBackend()
    sched = Scheduler(backend, token_budget=8, wait_window_s=0.0)

    async def main():
        running = sched.submit(0, 0, [1], 1, copy_rows)  # taken into a pass, blocked in the backend
        await asyncio.sleep(0.05)
        queued = sched.submit(1, 0, [9, 9], 1, copy_rows)
        assert sched.withdraw(queued) and queued.future.cancelled()
        assert not sched.withdraw(running)  # in a pass already: it completes
        backend.gate.set()
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
