"""The scheduler's batching policy, with a fake backend (ordering logic only, no model involved)."""
from __future__ import annotations

import asyncio

import numpy as np

from verifier_server.backend import ForwardItem
from verifier_server.scheduler import Scheduler


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


def test_concurrent_rounds_share_one_forward_pass():
    backend = RecordingBackend()
    sched = Scheduler(backend, token_budget=64, wait_window_s=0.5)
    sched.expected_rounds = 4  # four sessions are generating: their rounds should meet

    async def main():
        first = asyncio.create_task(sched.forward(0, 10, [1, 2, 3], 3))
        await asyncio.sleep(0.05)  # the others arrive a little later
        rest = asyncio.gather(*(sched.forward(s, 10, [1, 2, 3], 3) for s in range(1, 4)))
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
    sched.expected_rounds = 3  # but only one round comes

    async def main():
        t0 = asyncio.get_running_loop().time()
        await sched.forward(0, 0, [1], 1)
        return asyncio.get_running_loop().time() - t0

    waited = asyncio.run(main())
    sched.close()
    assert len(backend.passes) == 1
    assert 0.04 < waited < 2.0


def test_long_prefill_is_chunked_and_does_not_stall_other_rounds():
    backend = RecordingBackend()
    sched = Scheduler(backend, token_budget=16, wait_window_s=0.05)
    sched.expected_rounds = 3

    async def main():
        prefill = asyncio.create_task(sched.forward(0, 0, list(range(40)), 1))
        await asyncio.sleep(0.01)
        rounds = [asyncio.create_task(sched.forward(s, 5, [7, 8], 2)) for s in (1, 2)]
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


def test_a_failed_pass_fails_its_rounds_and_the_worker_carries_on():
    class Flaky(RecordingBackend):
        def forward(self, items):
            if not self.passes:
                self.passes.append(list(items))
                raise RuntimeError("decode failed")
            return super().forward(items)

    backend = Flaky()
    sched = Scheduler(backend, token_budget=8, wait_window_s=0.0)

    async def main():
        try:
            await sched.forward(0, 0, [1], 1)
        except RuntimeError as e:
            first = str(e)
        return first, await sched.forward(1, 0, [1], 1)

    first, second = asyncio.run(main())
    sched.close()
    assert first == "decode failed" and second.shape == (1, 4)


def test_calls_run_between_passes_in_submission_order():
    backend = RecordingBackend()
    sched = Scheduler(backend, token_budget=8, wait_window_s=0.0)
    events = []

    async def main():
        saved = sched.call(lambda: events.append(("save", len(backend.passes))) or b"state")
        logits = await sched.forward(0, 0, [1, 2], 1)  # the slot's new owner, queued after the save
        events.append(("forward", len(backend.passes)))
        return await saved, logits

    state, _ = asyncio.run(main())
    sched.close()
    assert state == b"state"
    assert events == [("save", 0), ("forward", 1)]
