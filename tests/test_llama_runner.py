"""The llama.cpp runner's bookkeeping (slots, parking, cancellation, release) over a fake backend.

The fake keeps a token list per KV sequence with llama.cpp's rollback semantics, refuses a write
that would leave a gap, and answers with a deterministic function of each sequence's tokens, so a
round that ran on the wrong KV state gives a wrong token. No model is involved. Its ``Gate`` holds
a pass and says when one is held: the races below are staged in the order they name, never timed.
"""
from __future__ import annotations

import asyncio
import pickle
from collections.abc import Coroutine
from typing import Any

import numpy as np
from test_scheduler import Gate

from verifier_server.acceptance import GREEDY
from verifier_server.llama.runner import LlamaRunner

VOCAB = 64


def next_token(seq: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(seq)) * 7 + len(seq)) % (VOCAB - 1) + 1


def reference(ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(next_token(out))
    return out[len(ids):]


class Tokenizer:
    """Bytes to ids 1..63 (0, which ``next_token`` never gives, ends a generation): enough of a
    target's tokenizer for an engine over this runner (tests/test_fleet.py)."""

    n_vocab = VOCAB
    kind = "fake"
    chat_template = None

    def encode(self, text: bytes) -> list[int]:
        return [b % (VOCAB - 1) + 1 for b in text]

    def piece(self, token: int) -> bytes:
        return b"" if token == 0 else bytes([ord("A") + token])

    def is_eog(self, token: int) -> bool:
        return token == 0

    def prompt_ids(self, prompt: str | None, messages: object) -> list[int]:
        return self.encode((prompt or "").encode())


class FakeBackend:
    name = "fake"
    model_name = "fake"
    ctx_per_slot = 256
    max_batch_tokens = 64
    n_params = 0

    def __init__(self, n_slots: int) -> None:
        self.n_slots = n_slots
        self.tokenizer = Tokenizer()
        self.kv: dict[int, list[int]] = {s: [] for s in range(n_slots)}
        self.passes: list[list[tuple[int, list[int]]]] = []
        self.gate = Gate()

    def forward(self, items):
        self.gate.enter(items)
        self.passes.append([(it.slot, list(it.tokens)) for it in items])
        out = []
        for it in items:
            held = self.kv[it.slot]
            assert it.pos <= len(held), f"slot {it.slot}: write at {it.pos} beyond {len(held)} held"
            self.kv[it.slot] = held[: it.pos] + list(it.tokens)
            seq = self.kv[it.slot]
            rows = np.zeros((it.n_logits, VOCAB), dtype=np.float32)
            for j in range(it.n_logits):
                end = len(seq) - it.n_logits + j + 1
                rows[j, next_token(seq[:end])] = 1.0
            out.append(rows)
        return out

    def save_state(self, slot: int) -> bytes:
        return pickle.dumps(self.kv[slot])

    def load_state(self, slot: int, state: bytes) -> None:
        self.kv[slot] = pickle.loads(state)

    def close(self) -> None:
        pass


def runner_for(backend: FakeBackend, **kw) -> LlamaRunner:
    return LlamaRunner(backend, token_budget=64, wait_window_s=0.0, calibration_sizes=(1, 2), **kw)


async def started(coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
    """A task for ``coro`` that has taken its first step: a round's first step queues its job, or
    its place in the line for a slot (nothing in it awaits before that). The tests then check the
    runner's counters, so a step that went elsewhere fails them instead of testing another race."""
    task = asyncio.create_task(coro)
    await asyncio.sleep(0)  # one turn of the loop: not a wait for time
    return task


async def generate(runner: LlamaRunner, key: str, ids: list[int], rounds: int, draft_len: int = 3) -> list[int]:
    """Rounds with drafts from the reference, every third one wrong: the committed ids."""
    ids = list(ids)
    await runner.prefill(key, ids)
    for r in range(rounds):
        good = reference(ids, draft_len)
        draft = good if r % 3 else [good[0], (good[1] % (VOCAB - 2)) + 1, good[2]]
        outcome = await runner.verify(key, ids, draft, GREEDY)
        ids += draft[: outcome.accepted] + [outcome.token]
    return ids


def test_more_sessions_than_slots_are_parked_restored_and_stay_exact():
    backend = FakeBackend(n_slots=2)
    runner = runner_for(backend)
    prompts = {f"s{i}": [i + 1, 5, 9, i + 3] for i in range(4)}

    async def main():
        ids = dict(prompts)
        for _ in range(3):  # interleaved: every session loses its slot between its rounds
            for key in ids:
                ids[key] = await generate(runner, key, ids[key], rounds=2)
        parked = runner.stats()["parked_sessions"]
        for key in ids:
            runner.release(key)
        return ids, parked

    ids, parked = asyncio.run(main())
    stats = runner.stats()
    runner.close()
    assert parked == 2
    for key, prompt in prompts.items():
        out = ids[key][len(prompt):]
        assert out == reference(prompt, len(out)), key
    assert stats["parked_bytes"] == 0 and stats["slots_in_use"] == 0


def test_a_round_cancelled_in_the_queue_never_reaches_the_slots_next_owner():
    backend = FakeBackend(n_slots=2)
    runner = runner_for(backend)

    async def main():
        c_ids, a_ids, b_ids = [1, 2, 3], [40, 41, 42], [7, 8, 9]
        await runner.prefill("c", c_ids)
        await runner.prefill("a", a_ids)
        backend.gate.close()
        c_round = asyncio.create_task(runner.verify("c", c_ids, [], GREEDY))
        await backend.gate.holding()  # c's round holds the pass
        a_round = await started(runner.verify("a", a_ids, [33, 34], GREEDY))
        a_queued = runner.stats()["queued_jobs"]  # behind c's pass
        a_round.cancel()  # a client went away
        await asyncio.gather(a_round, return_exceptions=True)
        b_task = await started(generate(runner, "b", b_ids, rounds=3))  # takes a's slot
        b_took_over = runner.stats()  # b's prompt queued in the place of a's round
        backend.gate.open()
        b_out = await b_task
        await c_round
        a_out = await generate(runner, "a", a_ids, rounds=2)  # a comes back: restored, exact
        return a_queued, b_took_over, b_ids, b_out, a_ids, a_out

    a_queued, b_took_over, b_ids, b_out, a_ids, a_out = asyncio.run(main())
    runner.close()
    assert a_queued == 1
    assert b_took_over["evictions"] == 1 and b_took_over["queued_jobs"] == 1
    assert all(tokens[-2:] != [33, 34] for p in backend.passes for _, tokens in p)
    for p in backend.passes:
        assert len({slot for slot, _ in p}) == len(p), "two jobs of one slot in a pass"
    assert b_out[len(b_ids):] == reference(b_ids, len(b_out) - len(b_ids))
    assert a_out[len(a_ids):] == reference(a_ids, len(a_out) - len(a_ids))


def test_a_round_cancelled_during_its_pass_keeps_its_slot_until_the_pass_ends():
    """The cancelled round is not withdrawn (a pass has it): it runs to its end on its slot, and
    the session that wants the slot waits in line, nothing of it queued, until that pass is over."""
    backend = FakeBackend(n_slots=1)
    runner = runner_for(backend)
    a_ids, b_ids = [40, 41, 42], [7, 8, 9]

    async def main():
        await runner.prefill("a", a_ids)
        backend.gate.close()
        a_round = asyncio.create_task(runner.verify("a", a_ids, [1, 2, 3, 4], GREEDY))
        await backend.gate.holding()  # a's round is in the pass now
        a_round.cancel()
        await asyncio.gather(a_round, return_exceptions=True)
        b_task = await started(generate(runner, "b", b_ids, rounds=2))
        while_a_runs = runner.stats()
        backend.gate.open()
        return while_a_runs, await b_task

    while_a_runs, b_out = asyncio.run(main())
    runner.close()
    assert while_a_runs["slot_waiters"] == 1 and while_a_runs["queued_jobs"] == 0  # b waits for the slot
    assert any((0, [42, 1, 2, 3, 4]) in p for p in backend.passes)  # a's round ran to its end
    assert b_out[len(b_ids):] == reference(b_ids, len(b_out) - len(b_ids))


def test_releasing_a_session_with_a_round_in_flight_frees_everything_after_the_pass():
    backend = FakeBackend(n_slots=1)
    runner = runner_for(backend)

    async def main():
        await runner.prefill("a", [1, 2, 3])
        backend.gate.close()
        a_round = asyncio.create_task(runner.verify("a", [1, 2, 3], [4], GREEDY))
        await backend.gate.holding()  # a's round is in the pass now
        runner.release("a")
        held_during = runner.stats()["slots_in_use"]
        backend.gate.open()
        await a_round
        return held_during

    held_during = asyncio.run(main())
    stats = runner.stats()
    runner.close()
    assert held_during == 1 and stats["slots_in_use"] == 0 and stats["parked_bytes"] == 0


def test_sessions_waiting_for_a_slot_are_served_in_arrival_order():
    """One slot, its owner mid-round: sessions that then ask for it get it first come, first
    served, and a newcomer that arrives as the slot frees waits behind them (no starvation)."""
    backend = FakeBackend(n_slots=1)
    runner = runner_for(backend)
    order: list[str] = []

    async def round_of(key: str) -> None:
        await runner.verify(key, [3, 4, 5], [], GREEDY)
        order.append(key)

    async def main():
        backend.gate.close()
        first = asyncio.create_task(round_of("owner"))
        await backend.gate.holding()  # the owner took the slot and is in its pass
        waiting = [await started(round_of(k)) for k in ("b", "c")]
        in_line = runner.stats()["slot_waiters"]
        backend.gate.open()
        await first
        late = asyncio.create_task(round_of("late"))  # arrives while c still waits its turn
        await asyncio.gather(*waiting, late)
        return in_line

    in_line = asyncio.run(main())
    runner.close()
    assert in_line == 2
    assert order == ["owner", "b", "c", "late"]
