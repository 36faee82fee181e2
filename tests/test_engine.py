"""The engine in-process over a fake runner: rounds, retries, stop strings with drafts, UTF-8
hold-back, finishing, resumes, cancellation and races. The runner is an oracle whose "target"
continues one prompt with a fixed text, byte by byte (a tokenizer of bytes): nothing here is
about a model, only about the engine's bookkeeping."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import numpy as np
import pytest

from shared.protocol import Proposal, SessionCreate, VerifyRequest
from verifier_server.acceptance import RowKind, TopRow, Uncertified
from verifier_server.app import create_app
from verifier_server.engine import Conflict, Engine, EngineConfig, EngineError, NotFound
from verifier_server.runner import RunnerError

from conftest import ROOT
from oracle import PROMPT, OracleRunner, settle


def run(continuation: str, scenario, runner_type=OracleRunner, **config):
    """Run ``scenario(engine, runner)`` on a fresh event loop."""
    async def main():
        runner = runner_type(continuation)
        engine = Engine(runner, EngineConfig(**config))
        return await scenario(engine, runner)

    return asyncio.run(main())


async def held_round(engine: Engine, runner: OracleRunner, draft: bytes = b"") -> tuple[str, asyncio.Task]:
    """A new session whose first round is under way and held in the runner until ``runner.gate``."""
    sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64))).session_id
    runner.gate.clear()
    task = asyncio.create_task(engine.verify(sid, VerifyRequest(round=1, draft=draft)))
    await runner.until_held()
    return sid, task


async def generate(engine: Engine, sid: str, drafts, first_round: int = 1):
    """Verify rounds with the given drafts (then empty ones) until finished; the answers."""
    answers, rnd, drafts = [], first_round, iter(drafts)
    while True:
        resp = await engine.verify(sid, VerifyRequest(round=rnd, draft=next(drafts, b"")))
        answers.append(resp)
        if resp.finished:
            return answers
        rnd += 1


def test_rounds_commit_the_targets_text_whatever_the_drafts():
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64))).session_id
        answers = await generate(engine, sid, [b"The c", b"at ", b"zzz", b"on the mat."])
        return answers, runner

    answers, runner = run("The cat sat on the mat.", scenario)
    assert b"".join(a.text for a in answers) == b"The cat sat on the mat."
    assert answers[-1].finish_reason == "eos"
    assert answers[0].accepted_tokens == 5 and answers[0].accepted_bytes == 5
    assert answers[2].accepted_tokens == 0  # "zzz": only the target's own token
    assert sum(len(a.ids) for a in answers) == answers[-1].committed_tokens + 0
    assert runner.rounds == len(answers)


def test_a_retried_round_gets_the_same_answer_and_rounds_stay_in_order():
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64))).session_id
        first = await engine.verify(sid, VerifyRequest(round=1, draft=b"abc"))
        again = await engine.verify(sid, VerifyRequest(round=1, draft=b"abc"))
        with pytest.raises(Conflict, match="next round is 2"):
            await engine.verify(sid, VerifyRequest(round=3))
        return first, again, runner.rounds

    first, again, rounds = run("abcdef", scenario)
    assert again == first and rounds == 1


def test_a_chained_round_continues_the_answer_it_bet_on_or_is_stale_and_commits_nothing():
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64))).session_id
        # Round 2 is sent while round 1 ("abc") is in flight, betting on "abc" + bonus "d".
        runner.gate.clear()
        first = asyncio.create_task(engine.verify(sid, VerifyRequest(round=1, draft=b"abc")))
        await runner.until_held()
        won = asyncio.create_task(engine.verify(sid, VerifyRequest(round=2, draft=b"abcdefg", chained=1)))
        await settle()  # round 2 waits for round 1's lock
        runner.gate.set()
        answers = [await first, await won]
        # The bet on round 3 loses ("xyz" is not the target's): stale, and 3 is still free.
        lost = await engine.verify(sid, VerifyRequest(round=3, draft=b"hxyz", chained=1))
        early = await engine.verify(sid, VerifyRequest(round=4, draft=b"h", chained=1))  # round 3 not done
        fresh = await engine.verify(sid, VerifyRequest(round=3, draft=b"ijk"))
        again = await engine.verify(sid, VerifyRequest(round=3, draft=b"hxyz", chained=1))  # a late copy
        # Rounds 5 and 6 sent behind round 4 before its answer: round 6 bets on the answers to 4 and 5.
        deep = [await engine.verify(sid, VerifyRequest(round=4, draft=b"mn")),
                await engine.verify(sid, VerifyRequest(round=5, draft=b"mnopq", chained=1)),
                await engine.verify(sid, VerifyRequest(round=6, draft=b"mnopqrs", chained=2))]
        return answers, lost, early, fresh, again, deep, runner.rounds

    (a1, a2), lost, early, fresh, again, deep, rounds = run("abcdefghijklmnopqrs", scenario)
    assert a1.text == b"abcd" and a2.text == b"efgh" and a2.accepted_bytes == 3 and not a2.stale
    assert lost.stale and early.stale and lost.text == b"" and lost.committed_tokens == 8
    assert fresh.text == b"ijkl" and fresh.round == 3 and not fresh.stale and again == fresh
    assert [a.text for a in deep] == [b"mno", b"pqr", b"s"] and deep[2].accepted_bytes == 1 and deep[2].finished
    assert rounds == 6  # stale rounds never reach the model


def test_a_stop_string_inside_a_draft_ends_the_generation_and_is_not_sent():
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64, stop=["END"]))).session_id
        return await generate(engine, sid, [b"one E", b"N", b"D more"])

    answers = run("one END more text", scenario)
    assert b"".join(a.text for a in answers) == b"one "
    assert answers[-1].finish_reason == "stop"
    # "E" and "EN" could still become the stop string: held back until it did
    assert all(not a.text.endswith((b"E", b"EN")) for a in answers)


def test_held_back_stop_prefix_is_released_when_it_does_not_become_the_stop():
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64, stop=["END"]))).session_id
        return await generate(engine, sid, [b"an E", b"Nx"])

    answers = run("an ENx.", scenario)
    assert b"".join(a.text for a in answers) == b"an ENx."
    assert answers[0].text == b"an "


def test_incomplete_characters_are_held_back_until_whole():
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64))).session_id
        return await generate(engine, sid, ["café 🎉".encode()[:4], b"", "é 🎉".encode()[1:]])

    answers = run("café 🎉 ok", scenario)
    for a in answers:
        a.text.decode("utf-8")  # strict: every answer is whole UTF-8
    assert b"".join(a.text for a in answers).decode() == "café 🎉 ok"


def test_finishing_inside_a_character_never_sends_half_of_it():
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=3))).session_id
        return await generate(engine, sid, ["abé".encode()])

    answers = run("abé", scenario)  # max_tokens ends after the first byte of "é"
    assert answers[-1].finish_reason == "length"
    for a in answers:
        a.text.decode("utf-8")
    assert b"".join(a.text for a in answers) == b"ab"


def test_a_resumed_session_continues_where_the_ids_end():
    async def scenario(engine, runner):
        done = list(b"The cat ")
        created = await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64, resume_ids=done))
        return await generate(engine, created.session_id, [b"sat"])

    answers = run("The cat sat.", scenario)
    assert b"".join(a.text for a in answers) == b"sat."
    assert answers[-1].committed_tokens == len("The cat sat.") + 1


def test_a_failed_round_commits_nothing_and_can_be_retried():
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64))).session_id
        runner.fail = RunnerError("forward pass failed")
        with pytest.raises(RunnerError):
            await engine.verify(sid, VerifyRequest(round=1, draft=b"ab"))
        return await engine.verify(sid, VerifyRequest(round=1, draft=b"ab"))

    resp = run("abc", scenario)
    assert resp.text == b"abc" and resp.committed_tokens == 3


def test_a_cancelled_round_commits_nothing():
    async def scenario(engine, runner):
        sid, task = await held_round(engine, runner, b"ab")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        runner.gate.set()
        return await engine.verify(sid, VerifyRequest(round=1, draft=b"a"))

    resp = run("abc", scenario)
    assert resp.text == b"ab" and resp.committed_tokens == 2


def test_a_round_waiting_behind_a_delete_finds_the_session_gone():
    async def scenario(engine, runner):
        sid, first = await held_round(engine, runner)
        delete = asyncio.create_task(engine.delete(sid))  # waits for the round in flight
        await settle()
        second = asyncio.create_task(engine.verify(sid, VerifyRequest(round=2)))
        await settle()
        runner.gate.set()
        results = await asyncio.gather(first, delete, second, return_exceptions=True)
        return results, runner, sid, engine

    (first, deleted, second), runner, sid, engine = run("abc", scenario)
    assert first.text == b"a" and deleted is None
    assert isinstance(second, NotFound)
    assert runner.rounds == 1 and runner.released == [sid] and not engine.sessions


def test_creation_with_an_idempotency_key_happens_once():
    async def scenario(engine, runner):
        req = SessionCreate(prompt=PROMPT, max_tokens=8, idempotency_key="k1")
        runner.gate.clear()  # the first creation is still prefilling when its retry arrives
        tasks = [asyncio.create_task(engine.create(req)) for _ in range(2)]
        await runner.until_held()
        await settle()  # the retry waits on the first creation
        runner.gate.set()
        a, b = await asyncio.gather(*tasks)
        later = await engine.create(req)
        with pytest.raises(Conflict, match="different session request"):
            await engine.create(SessionCreate(prompt="other", max_tokens=8, idempotency_key="k1"))
        other = await engine.create(SessionCreate(prompt=PROMPT, max_tokens=8, idempotency_key="k2"))
        return a, b, later, other, runner, len(engine.sessions)

    a, b, later, other, runner, n_sessions = run("abc", scenario)
    assert a.session_id == b.session_id == later.session_id != other.session_id
    assert n_sessions == 2 and len(runner.prefilled) == 2


def test_a_creation_whose_first_caller_went_away_still_answers_its_retry():
    async def scenario(engine, runner):
        req = SessionCreate(prompt=PROMPT, max_tokens=8, idempotency_key="k1")
        runner.gate.clear()
        first = asyncio.create_task(engine.create(req))
        await runner.until_held()
        first.cancel()  # the client timed out while its session was being prefilled
        await asyncio.gather(first, return_exceptions=True)
        retry = asyncio.create_task(engine.create(req))
        runner.gate.set()
        return await retry, first.cancelled(), len(engine.sessions), runner.prefilled

    created, cancelled, n_sessions, prefilled = run("abc", scenario)
    assert cancelled and n_sessions == 1 and prefilled == [created.session_id]


def test_bad_requests_are_refused_with_the_reason():
    async def scenario(engine, runner):
        with pytest.raises(Exception, match="no chat template"):
            await engine.create(SessionCreate(messages=[{"role": "user", "content": "hi"}]))
        with pytest.raises(Exception, match="outside the vocabulary"):
            await engine.create(SessionCreate(prompt=PROMPT, resume_ids=[999]))
        with pytest.raises(NotFound):
            await engine.verify("nope", VerifyRequest(round=1))
        return runner.prefilled

    assert run("abc", scenario) == []


def test_the_hint_recommends_drafts_on_a_flat_cost_curve_and_none_once_finished():
    async def scenario(engine, runner):
        created = await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64))
        answers = await generate(engine, created.session_id, [b"abcdef"])
        return created, answers

    created, answers = run("abcdef", scenario, max_draft_tokens=8)
    assert created.draft_hint > 0
    assert answers[-1].finished and answers[-1].draft_hint == 0


def test_the_engine_the_app_and_the_protocol_import_without_llama_cpp():
    code = (
        "import sys; sys.modules['llama_cpp'] = None\n"  # any import of it now fails
        "import shared.protocol, shared.codec, shared.alignment, shared.chat, shared.models\n"
        "import verifier_server.engine, verifier_server.app, verifier_server.runner\n"
        "import verifier_server.lossless, verifier_server.process\n"
        "import edge_agent.agent, edge_agent.client, edge_agent.options\n"
        "import bench.metrics, bench.report, bench.gpu_model, bench.replay\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


class _OnTopRows:
    """``rule`` applied to the top-``k`` rows cut from the dense ones, as an engine that gives
    top-K rows does: and, where they cannot settle the round, to the dense rows."""

    def __init__(self, rule, k: int, runner: TopRowsOracle) -> None:
        self.rule, self.k, self.runner = rule, k, runner
        self.name, self.needs = rule.name, rule.needs

    def accept(self, candidates, rows):
        top = []
        for x in rows:
            lp = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64)).sum())
            ids = np.lexsort((np.arange(x.size), -lp))[: self.k]
            top.append(TopRow(ids, lp[ids], x.size))
        try:
            return self.rule.accept(candidates, top)
        except Uncertified:
            self.runner.full_rounds += 1
            return self.rule.accept(candidates, rows)


class TopRowsOracle(OracleRunner):
    """The oracle as an engine that serves top-K rows only (full rows only as a fallback)."""

    name = "top-rows"
    row_kinds = frozenset({RowKind.TOP})

    def __init__(self, continuation: str) -> None:
        super().__init__(continuation)
        self.full_rounds = 0

    async def verify(self, key, ids, candidates, rule):
        return await super().verify(key, ids, candidates, _OnTopRows(rule, 4, self))


def test_capabilities_follow_the_rows_the_runner_serves():
    full = Engine(OracleRunner("abc")).info().capabilities
    top = Engine(TopRowsOracle("abc")).info().capabilities
    assert {"greedy", "sample-slem", "sample-tli"} <= set(full)
    assert "greedy" in top and "sample-slem" in top and "sample-tli" not in top
    assert [c for c in full if not c.startswith(("greedy", "sample-"))] == [c for c in top if not c.startswith(("greedy", "sample-"))]


def test_a_tli_round_on_an_engine_of_top_rows_is_refused_with_400_naming_the_rule():
    async def scenario(engine, runner):
        app = create_app(engine)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://verifier") as c:
            info = (await c.get("/v1/info")).json()
            created = await c.post("/v1/sessions", json={"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0,
                                                         "seed": 5})
            sid = created.json()["session_id"]
            body = VerifyRequest(round=1, draft=b"T", draft_ids=[ord("T")],
                                 proposals=[Proposal(ids=[ord("T")], probs=[1.0])]).model_dump(mode="json")
            refused = await c.post(f"/v1/sessions/{sid}/verify", json=body)
        return info, created.status_code, refused

    info, created, refused = run("The cat.", scenario, TopRowsOracle)
    assert "sample-tli" not in info["capabilities"] and created == 201
    assert refused.status_code == 400, refused.text
    assert "'sample-tli'" in refused.text and "top-K rows only" in refused.text and "--full-rows" in refused.text


def test_slem_sessions_commit_the_same_ids_from_top_rows_as_from_full_rows():
    """Seeded sampling over the oracle's rows (one-hot logits sampled at temperature 1: every byte
    is possible), with plain drafts: top-K rows, and full rows where they cannot settle a round,
    commit exactly the ids full rows do."""
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=24, temperature=1.0, seed=5))).session_id
        answers = await generate(engine, sid, [b"The", b" cat"])
        return [t for a in answers for t in a.ids], getattr(runner, "full_rounds", None)

    full, _ = run("The cat sat on the mat.", scenario)
    top, fallbacks = run("The cat sat on the mat.", scenario, TopRowsOracle)
    assert top == full and len(full) == 24
    assert fallbacks  # such flat rows mostly defeat the certificate: the fallback path ran


def test_greedy_rounds_settle_from_top_rows_and_tli_rules_are_refused_in_the_engine():
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64))).session_id
        answers = await generate(engine, sid, [b"The c", b"at ", b"zzz"])
        sampled = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=8, temperature=0.7))).session_id
        with pytest.raises(EngineError, match="rule 'sample-tli' needs full-vocabulary rows") as refused:
            await engine.verify(sampled, VerifyRequest(round=1, draft=b"T", draft_ids=[ord("T")],
                                                       proposals=[Proposal(ids=[ord("T")], probs=[1.0])]))
        return answers, runner.full_rounds, refused.value.status

    answers, full_rounds, status = run("The cat sat.", scenario, TopRowsOracle)
    assert b"".join(a.text for a in answers) == b"The cat sat."
    assert answers[0].accepted_tokens == 5 and full_rounds == 0 and status == 400
