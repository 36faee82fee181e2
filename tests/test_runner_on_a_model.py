"""The llama.cpp runner in-process on a real model: parked state comes back bit for bit, and a round
cancelled while queued (a client that went away) does not touch the session that takes over its
slot."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from shared.models import resolve
from verifier_server.acceptance import GREEDY
from verifier_server.lossless import Reference, judge

from conftest import LOSSLESS_REPORT
from prompts import RAW

TARGET = "qwen2.5-coder-0.5b"
MAX_TOKENS = 24
pytestmark = pytest.mark.slow


async def _generate(runner, key: str, prompt: list[int], ref: Reference, until: int = MAX_TOKENS,
                    ids: list[int] | None = None) -> list[int]:
    """Rounds whose drafts are the reference's next 4 ids with the third one wrong, until ``until``
    ids are generated; continues ``ids`` (prompt + generated) when given. Returns the generated ids."""
    if ids is None:
        ids = list(prompt)
        await runner.prefill(key, ids)
    while len(ids) - len(prompt) < until:
        at = len(ids) - len(prompt)
        draft = ref.ids[at : at + 4]
        if len(draft) > 2:
            draft[2] = (draft[2] + 1) % 1000
        outcome = await runner.verify(key, ids, draft[: MAX_TOKENS - at - 1], GREEDY)
        ids += draft[: outcome.accepted] + [outcome.token]
    return ids[len(prompt) :]


def test_a_parked_session_continues_exactly_as_one_that_kept_its_slot(reference_backend):
    from verifier_server.llama.backend import LlamaBackend
    from verifier_server.llama.reference import plain_reference
    from verifier_server.llama.runner import LlamaRunner

    tok = reference_backend(TARGET).tokenizer
    a_prompt, b_prompt = tok.prompt_ids(RAW[3], None), tok.prompt_ids(RAW[4], None)
    refs = {k: plain_reference(reference_backend(TARGET), p, MAX_TOKENS)
            for k, p in (("a", a_prompt), ("b", b_prompt))}

    def fresh_runner() -> LlamaRunner:
        backend = LlamaBackend(resolve(TARGET), TARGET, n_slots=1, ctx_per_slot=1024, n_threads=2)
        return LlamaRunner(backend, wait_window_s=0.0)

    async def parked(runner: LlamaRunner) -> tuple[list[int], int]:
        first = await _generate(runner, "a", a_prompt, refs["a"], until=MAX_TOKENS // 2)
        await _generate(runner, "b", b_prompt, refs["b"])  # takes the only slot: a is parked
        was_parked = runner.stats()["parked_sessions"]
        rest = await _generate(runner, "a", a_prompt, refs["a"], ids=a_prompt + first)
        return rest, was_parked

    async def kept(runner: LlamaRunner) -> list[int]:
        return await _generate(runner, "a", a_prompt, refs["a"])

    runners = [fresh_runner(), fresh_runner()]
    try:
        (with_parking, was_parked), without = asyncio.run(parked(runners[0])), asyncio.run(kept(runners[1]))
    finally:
        for r in runners:
            r.close()
    assert was_parked == 1
    assert with_parking == without


def test_a_round_cancelled_in_the_queue_leaves_every_session_lossless(reference_backend):
    from verifier_server.llama.backend import LlamaBackend
    from verifier_server.llama.reference import plain_reference
    from verifier_server.llama.runner import LlamaRunner

    ref_backend = reference_backend(TARGET)
    tok = ref_backend.tokenizer
    a_prompt, b_prompt = tok.prompt_ids(RAW[0], None), tok.prompt_ids(RAW[1], None)
    refs = {k: plain_reference(ref_backend, p, MAX_TOKENS) for k, p in (("a", a_prompt), ("b", b_prompt))}
    long_prompt = tok.encode(b"def add(a, b):\n    return a + b\n\n" * 120)[:1200]
    backend = LlamaBackend(resolve(TARGET), TARGET, n_slots=2, ctx_per_slot=2048, n_batch=256, n_threads=2)
    runner = LlamaRunner(backend, token_budget=256, wait_window_s=0.0)

    async def main():
        await runner.prefill("a", a_prompt)
        busy = asyncio.create_task(runner.prefill("c", long_prompt))  # chunked: passes of 256 tokens
        await asyncio.sleep(0.2)
        a_round = asyncio.create_task(runner.verify("a", a_prompt, refs["a"].ids[:3], GREEDY))
        await asyncio.sleep(0.01)  # queued behind the prefill chunk in the pass
        a_round.cancel()
        await asyncio.gather(a_round, return_exceptions=True)
        b_ids = await _generate(runner, "b", b_prompt, refs["b"])  # takes a's slot
        assert runner.stats()["parked_sessions"] == 1  # a's state went to host memory
        await busy
        runner.release("c")
        a_ids = await _generate(runner, "a", a_prompt, refs["a"])  # restored from host memory
        return a_ids, b_ids

    try:
        a_ids, b_ids = asyncio.run(main())
        stats = runner.stats()
    finally:
        runner.close()
    verdicts = {k: judge(ids, refs[k]) for k, ids in (("a", a_ids), ("b", b_ids))}
    LOSSLESS_REPORT.append(
        f"cancelled round on {TARGET}: " + ", ".join(f"{k} {v.kind}" for k, v in verdicts.items())
    )
    assert all(v.kind != "diverged" for v in verdicts.values()), verdicts
    assert stats["parked_sessions"] == 0 and stats["forward_passes"] > 0


@pytest.fixture(scope="module")
def model_backend():
    """A two-slot backend of the target, loaded once for this module."""
    from verifier_server.llama.backend import LlamaBackend

    backend = LlamaBackend(resolve(TARGET), TARGET, n_slots=2, ctx_per_slot=1024, n_threads=2)
    yield backend
    backend.close()


def test_a_parked_state_is_restored_bit_for_bit(model_backend):
    from verifier_server.llama.forward import ForwardItem

    b = model_backend
    ids = b.tokenizer.encode(RAW[2].encode())
    b.forward([ForwardItem(0, 0, ids, 0)])
    saved = b.save_state(0)
    b.forward([ForwardItem(0, 0, b.tokenizer.encode(b"something else entirely"), 0)])  # a new owner
    b.load_state(0, saved)
    assert b.save_state(0) == saved
    b.load_state(1, saved)  # the same state in another slot
    nxt = ids[-1]
    here = np.array(b.forward([ForwardItem(0, len(ids), [nxt], 1)])[0][0])
    there = np.array(b.forward([ForwardItem(1, len(ids), [nxt], 1)])[0][0])
    assert np.array_equal(here, there)
