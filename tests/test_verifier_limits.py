"""The verifier under bursts and bad input (issue 17): session caps that hold under concurrent
creates, bounded stop strings with a linear hold-back, bodies refused while they stream, answers
replayed to retries behind chained rounds, authenticated stats, per-address anonymous callers and
creations paced like rounds. The engine runs over the oracle runner of ``test_engine`` (nothing
here is about a model), the app through its real ASGI interface."""
from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.fleet import DeviceLimits
from shared.protocol import MAX_STOP_BYTES, MAX_STOPS, SessionCreate, VerifyRequest
from shared.utf8 import complete_prefix_len
from verifier_server.app import create_app
from verifier_server.auth import Credentials, hash_token
from verifier_server.engine import Busy, Engine, EngineConfig, LimitExceeded
from verifier_server.metrics import metrics_app
from verifier_server.quantiles import DurationHistogram
from verifier_server.stops import StopMatcher

from huge_body import stream_into
from oracle import PROMPT, OracleRunner, settle
from test_engine import run


# --- session caps under a burst -----------------------------------------------------------------
def test_concurrent_creates_get_exactly_the_devices_cap_and_429s_for_the_rest():
    async def scenario(engine, runner):
        creates = [engine.create(SessionCreate(prompt=PROMPT, max_tokens=8), "pi") for _ in range(40)]
        return await asyncio.gather(*creates, return_exceptions=True)

    results = run("abc", scenario, device_sessions=5)
    refused = [r for r in results if isinstance(r, LimitExceeded)]
    assert len(results) - len(refused) == 5 and len(refused) == 35


def test_concurrent_creates_of_many_devices_stop_at_the_servers_cap():
    async def scenario(engine, runner):
        creates = [engine.create(SessionCreate(prompt=PROMPT, max_tokens=8), f"pi-{i % 4}") for i in range(40)]
        results = await asyncio.gather(*creates, return_exceptions=True)
        return results, len(engine.sessions)

    results, held = run("abc", scenario, max_sessions=7)
    assert held == 7 and sum(isinstance(r, Busy) for r in results) == 33


def test_a_failed_creation_gives_its_place_back():
    async def scenario(engine, runner):
        with pytest.raises(Exception, match="empty"):
            await engine.create(SessionCreate(prompt="", max_tokens=8), "pi")
        return (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=8), "pi")).session_id

    assert run("abc", scenario, device_sessions=1)


# --- stop strings ---------------------------------------------------------------------------------
def test_stop_strings_are_capped_in_number_and_length():
    with pytest.raises(ValidationError, match="stop"):
        SessionCreate(prompt="x", stop=[str(i) for i in range(MAX_STOPS + 1)])
    with pytest.raises(ValidationError, match=f"at most {MAX_STOP_BYTES} bytes"):
        SessionCreate(prompt="x", stop=["é" * (MAX_STOP_BYTES // 2 + 1)])
    SessionCreate(prompt="x", stop=["a" * MAX_STOP_BYTES] * MAX_STOPS)


def _held_spec(text: bytes, stops: list[bytes]) -> int:
    """How far ``text`` may be sent, by definition: whole characters, and not from the earliest
    position whose rest is a proper prefix of a stop string (the next bytes could complete it)."""
    start = next((p for p in range(len(text)) if any(len(text) - p < len(s) and s.startswith(text[p:])
                                                     for s in stops)), len(text))
    return min(complete_prefix_len(text), start)


def _quadratic_hold_back(text: bytes, stops: list[bytes]) -> int:
    """The hold-back this module replaced (every suffix against every stop's prefixes)."""
    end = complete_prefix_len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k : end] == stop[:k]:
                end -= k
                break
    return end


alphabet = st.sampled_from([b"a", b"b", b"c", "é".encode()[:1], "é".encode()[1:]])
texts = st.lists(st.lists(alphabet, max_size=4).map(b"".join), max_size=12)  # pieces, as tokens commit
stop_sets = st.lists(st.lists(alphabet, min_size=1, max_size=5).map(b"".join), min_size=1, max_size=4)


@settings(max_examples=400, deadline=None)
@given(pieces=texts, stops=stop_sets)
def test_the_linear_hold_back_and_stop_search_equal_their_definitions(pieces, stops):
    matcher, text = StopMatcher(stops), b""
    for piece in pieces:
        cut = matcher.feed(piece)
        before, text = len(text), text + piece
        hits = [i for s in stops if (i := text.find(s, max(0, before - len(s) + 1))) >= 0]
        assert cut == (min(hits) if hits else None)
        if cut is not None:
            return  # the generation ends there
        assert min(complete_prefix_len(text), len(text) - matcher.pending()) == _held_spec(text, stops)


@settings(max_examples=300, deadline=None)
@given(pieces=texts, stop=st.lists(st.sampled_from([b"a", b"b", b"c"]), min_size=1, max_size=6).map(b"".join))
def test_the_hold_back_equals_the_old_one_for_a_stop_string_on_whole_characters(pieces, stop):
    """With one stop string and ASCII text the old hold-back was exact; with several it could hold
    back more than needed (it checked each stop after the one before had shortened the text)."""
    text = b"".join(pieces).replace(b"\xc3", b"a").replace(b"\xa9", b"b")
    matcher = StopMatcher([stop])
    if matcher.feed(text) is None:
        assert len(text) - matcher.pending() == _quadratic_hold_back(text, [stop])


def test_long_stop_strings_are_matched_across_rounds():
    async def scenario(engine, runner):
        stop = "x" * 200 + "END"
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=400, stop=[stop]))).session_id
        answers = []
        for rnd in range(1, 500):
            answers.append(await engine.verify(sid, VerifyRequest(round=rnd, draft=b"x" * 16)))
            if answers[-1].finished:
                return answers

    answers = run("ab" + "x" * 200 + "END tail", scenario)
    assert b"".join(a.text for a in answers) == b"ab" and answers[-1].finish_reason == "stop"


def test_a_session_whose_round_waited_longer_than_its_ttl_is_not_expired_on_answering():
    """On a loaded verifier (1,000 devices on a CPU) a round can wait minutes for its pass; the
    time-to-live counts from its answer, not from its arrival."""
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=8))).session_id
        runner.gate.clear()
        held = asyncio.create_task(engine.verify(sid, VerifyRequest(round=1)))
        await runner.until_held()
        engine.sessions[sid].last_used -= 2 * engine.config.session_ttl_s  # the round waits that long
        runner.gate.set()
        await held
        engine.expire_idle()  # the device's next round is on its way
        return (await engine.verify(sid, VerifyRequest(round=2))).round

    assert run("abc", scenario) == 2


# --- retries behind chained rounds ----------------------------------------------------------------
def test_a_retry_of_a_round_answered_before_a_chained_one_gets_its_answer_again():
    async def scenario(engine, runner):
        sid = (await engine.create(SessionCreate(prompt=PROMPT, max_tokens=64))).session_id
        runner.gate.clear()
        first = asyncio.create_task(engine.verify(sid, VerifyRequest(round=1, draft=b"abc")))
        await runner.until_held()
        chained = asyncio.create_task(engine.verify(sid, VerifyRequest(round=2, draft=b"abcdefg", chained=1)))
        await settle()  # round 2 waits for round 1's lock
        runner.gate.set()
        answers = [await first, await chained]
        # Round 1's answer was lost on its way back; the device retries it after round 2 committed.
        retried = await engine.verify(sid, VerifyRequest(round=1, draft=b"abc"))
        return answers, retried, runner.rounds

    (first, chained), retried, rounds = run("abcdefghijk", scenario)
    assert not chained.stale and retried == first and rounds == 2


# --- the app: bodies, stats, anonymous callers, creations paced -----------------------------------
async def _asgi(app, method: str, path: str, client: tuple[str, int] = ("127.0.0.1", 5000), **kw) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client),
                                 base_url="http://verifier") as c:
        return await c.request(method, path, **kw)


def _app(**kw):
    return create_app(Engine(OracleRunner("abcdef"), EngineConfig()), **kw)


def test_a_streamed_body_is_refused_once_past_the_limit_without_reading_the_rest():
    """A 50 MB chunked body (no Content-Length): the app stops reading just past its limit."""
    status, body, read = stream_into(_app(), "/v1/sessions")
    assert status == 413 and b"exceeds the limit" in body
    assert read < (2 << 20)  # the limit (~1 MiB) and a chunk: not 50 MB


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    response = asyncio.run(_asgi(_app(), "POST", "/v1/sessions", content=b"{}",
                                 headers={"content-length": str(50 << 20)}))
    assert response.status_code == 413 and "exceeds the limit" in response.json()["error"]["message"]


def test_stats_need_a_token_unless_authentication_is_off():
    token = "sled_operator"
    creds = Credentials({"ops": hash_token(token)})
    app = _app(credentials=creds)
    assert asyncio.run(_asgi(app, "GET", "/v1/stats")).status_code == 401
    ok = asyncio.run(_asgi(app, "GET", "/v1/stats", headers={"authorization": f"Bearer {token}"}))
    assert ok.status_code == 200 and ok.json()["round_overhead_ms"]["rounds"] == 0
    assert asyncio.run(_asgi(_app(), "GET", "/v1/stats")).status_code == 200


def test_metrics_can_move_to_an_operator_only_listener():
    app = _app(serve_metrics=False)
    assert asyncio.run(_asgi(app, "GET", "/metrics")).status_code == 404
    scraped = asyncio.run(_asgi(metrics_app(app.state.metrics), "GET", "/metrics"))
    assert scraped.status_code == 200 and "sled:sessions_active" in scraped.text
    assert asyncio.run(_asgi(_app(), "GET", "/metrics")).status_code == 200


def test_anonymous_callers_are_limited_by_their_address():
    app = create_app(Engine(OracleRunner("abcdef"), EngineConfig(device_sessions=1)))

    async def scenario():
        body = {"prompt": PROMPT, "max_tokens": 4}
        return [(await _asgi(app, "POST", "/v1/sessions", client=(host, 5000), json=body)).status_code
                for host in ("10.0.0.1", "10.0.0.2", "10.0.0.1")]

    assert asyncio.run(scenario()) == [201, 201, 429]


def test_session_creations_count_in_the_devices_round_bucket():
    app = _app(limits=DeviceLimits(rounds_per_s=0.001, burst=2))

    async def scenario():
        body = {"prompt": PROMPT, "max_tokens": 4}
        return [(await _asgi(app, "POST", "/v1/sessions", json=body)) for _ in range(3)]

    *ok, refused = asyncio.run(scenario())
    assert [r.status_code for r in ok] == [201, 201] and refused.status_code == 429
    assert "session creation" in refused.json()["error"]["message"] and refused.headers["retry-after"]


# --- percentiles without a window of samples ------------------------------------------------------
def test_the_duration_histogram_tracks_percentiles_within_its_bucket_width():
    rng = random.Random(7)
    samples = [rng.lognormvariate(-7, 1.2) for _ in range(20000)]
    hist = DurationHistogram()
    for x in samples:
        hist.record(x)
    ordered = sorted(samples)
    for q in (0.5, 0.95):
        exact = ordered[round(q * (len(ordered) - 1))]
        assert abs(hist.quantile(q) / exact - 1) < 0.03
    assert hist.summary_ms()["rounds"] == 20000 and DurationHistogram().quantile(0.5) == 0.0
