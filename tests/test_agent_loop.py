"""The agent's round loop in the quick loop: the real ``Agent``, ``VerifierClient`` and verifier
routes (``create_app`` over an ``Engine``) with the oracle runner (``tests/oracle.py``) and a drafter
that guesses the oracle's text, joined by an in-process network that can kill a replica, lose a
request or an answer after the server handled it, and hold a request until another one has arrived
or been answered, so that each scenario happens in the order it names, every run.

Whatever happens on the way, a generation must give exactly the oracle's text and ids: nothing
duplicated, nothing lost."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Container
from dataclasses import dataclass

import httpx
import pytest

from edge_agent.agent import Agent, GenerationCancelled, GenerationResult
from edge_agent.client import VerifierClient
from edge_agent.drafting import ModelSource
from shared.codec import MSGPACK, decode, encode
from shared.protocol import ErrorBody, ErrorResponse, VerifyRequest
from verifier_server.app import create_app
from verifier_server.engine import Engine, EngineConfig

from oracle import EOS, PROMPT, ByteTokenizer, OracleRunner

TEXT = "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # five\n"
DRAFT = 4  # drafter tokens (bytes) a round
WAIT_S = 5.0  # bound on every wait for another request: a scenario that no longer happens fails, never hangs


class OracleDrafter:
    """A drafter for ``ModelSource`` whose tokens are bytes: it guesses the oracle's text, except at
    the positions in ``wrong`` and past the text's end, where it guesses '#'."""

    def __init__(self, wrong: Container[int] = ()) -> None:
        self.tokenizer = ByteTokenizer()
        self.wrong = wrong
        self.tokens: list[int] = []
        self.prefill_s = 0.0  # no context to catch up on: its tokens cost nothing

    def start(self, prompt: str | None, messages: object) -> None:
        assert prompt is not None
        self.tokens = list(prompt.encode())

    def commit(self, text: bytes) -> list[int]:
        self.tokens += text
        return list(text)

    def defer(self, text: bytes) -> None:
        self.tokens += text

    def greedy(self, k: int, after: list[int] | tuple = (), stop: object = None,
               pick: object = None) -> tuple[list[int], list[float]]:
        at = len(self.tokens) + len(after) - len(PROMPT)
        ids = [self.guess(at + i) for i in range(k)]
        return ids, [1.0] * len(ids) if stop is not None else []

    def guess(self, position: int) -> int:
        target = TEXT.encode()
        return target[position] if position < len(target) and position not in self.wrong else ord("#")


class Replica:
    """A verifier in-process: the real app over an ``Engine`` over an ``OracleRunner``, served on
    an event loop of its own thread, as a server would be."""

    def __init__(self, name: str) -> None:
        self.runner = OracleRunner(TEXT)
        self.engine = Engine(self.runner, EngineConfig(max_draft_tokens=16), session_prefix=name)
        self.app = httpx.ASGITransport(create_app(self.engine))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def handle(self, request: httpx.Request) -> httpx.Response:
        async def serve() -> httpx.Response:
            response = await self.app.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content, request=request)

        return asyncio.run_coroutine_threadsafe(serve(), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@dataclass(frozen=True)
class Call:
    """A request as the network saw it."""

    host: str
    request: httpx.Request
    session: str | None = None  # of a verify round
    round: int = 0
    chained: int = 0
    attempt: int = 1  # 2: the client's first retry of the same request

    @property
    def plain(self) -> bool:
        """A verify round sent after the answer to the one before it."""
        return self.session is not None and not self.chained


Hook = Callable[[Call], None]
AfterHook = Callable[[Call], "httpx.Response | None"]


class Network(httpx.BaseTransport):
    """Carries a client's requests to in-process replicas by host name. ``before`` runs as a
    request arrives (it may hold it, or raise a transport error: the request never reached the
    server), ``after`` once the server has answered (it may hold the answer, raise: the answer was
    lost after the server committed the round, or return another answer to deliver instead). A
    replica in ``dead`` refuses connections."""

    def __init__(self, names: list[str]) -> None:
        self.replicas = {name: Replica(name) for name in names}
        self.dead: set[str] = set()
        self.before: list[Hook] = []
        self.after: list[AfterHook] = []
        self.calls: list[Call] = []
        self._lock = threading.Condition()
        self._events: dict[tuple[str, str, int], threading.Event] = {}
        self._seen: dict[tuple[str, str, bytes], int] = {}
        self._in_flight = 0

    @property
    def urls(self) -> list[str]:
        return [f"http://{name}" for name in self.replicas]

    def event(self, kind: str, session: str, round_no: int) -> threading.Event:
        """Set when a verify request for (session, round) has 'arrived' or been 'answered'."""
        with self._lock:
            return self._events.setdefault((kind, session, round_no), threading.Event())

    def wait(self, kind: str, session: str, round_no: int) -> None:
        assert self.event(kind, session, round_no).wait(WAIT_S), f"round {round_no} never {kind}"

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self._in_flight += 1
        try:
            return self._carry(request)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()

    def _carry(self, request: httpx.Request) -> httpx.Response:
        call = self._arrive(request)
        if call.host in self.dead:
            raise httpx.ConnectError("connection refused", request=request)
        for hook in self.before:
            hook(call)
        response = self.replicas[call.host].handle(request)
        if call.session is not None:
            self.event("answered", call.session, call.round).set()
        for hook in self.after:
            response = hook(call) or response
        return response

    def _arrive(self, request: httpx.Request) -> Call:
        content = request.read()
        host = request.url.host
        key = (host, request.url.path, content)  # a retry sends the very same request
        with self._lock:
            attempt = self._seen[key] = self._seen.get(key, 0) + 1
        parts = request.url.path.split("/")  # /v1/sessions/{id}/verify
        if request.method != "POST" or parts[-1] != "verify":
            call = Call(host, request, attempt=attempt)
        else:
            req = decode(content, MSGPACK, VerifyRequest)
            call = Call(host, request, parts[-2], req.round, req.chained, attempt)
            self.event("arrived", call.session, call.round).set()
        with self._lock:
            self.calls.append(call)
        return call

    def first(self, call: Call) -> bool:
        """Whether ``call`` belongs to the first session the network carried: a scenario's fault
        happens there, once, and not again to a session the agent rebuilds."""
        return call.session is not None and call.session == self.verify_calls()[0].session

    def verify_calls(self, host: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.session is not None and host in (None, c.host)]

    def shutdown(self) -> None:
        """(Not ``close``, which each client calls on its transport.) Wait until the requests still travelling (rounds the agent left behind) have answered,
        then stop the replicas."""
        with self._lock:
            for event in self._events.values():
                event.set()  # a scenario that failed half-way leaves nothing held
            assert self._lock.wait_for(lambda: self._in_flight == 0, WAIT_S)
        for replica in self.replicas.values():
            replica.close()


@pytest.fixture
def network():
    made: list[Network] = []

    def make(*names: str) -> Network:
        made.append(Network(list(names or ("a",))))
        return made[-1]

    yield make
    for net in made:
        net.shutdown()


def lose_answer(call: Call) -> None:
    raise httpx.ReadError("connection reset by peer", request=call.request)


def chain_behind_every_round(net: Network) -> None:
    """Hold every plain round's answer until the chained round behind it has arrived: a pipelined
    agent then always has two rounds in flight (it drafts ahead without delay)."""
    def hold(call: Call) -> None:
        if call.plain:
            net.wait("arrived", call.session, call.round + 1)

    net.after.append(hold)


def generate(net: Network, drafter: OracleDrafter | None = None, pipelined: bool = False, retries: int = 2,
             **kwargs) -> GenerationResult:
    with VerifierClient(net.urls, retries=retries, backoff_s=0.0, transport=net) as client:
        agent = Agent(client, ModelSource(drafter or OracleDrafter()), draft_tokens=DRAFT, follow_hint=False,
                      pipelined=pipelined, deadline_s=2.0)
        return agent.generate(PROMPT, max_tokens=200, **kwargs)


def assert_exact(result: GenerationResult) -> None:
    """The oracle's text and ids, each once: nothing duplicated, nothing lost."""
    assert result.text == TEXT.encode()
    assert result.ids == list(TEXT.encode()) + [EOS]
    assert result.finish_reason == "eos"


def assert_no_sessions_left(net: Network, *hosts: str) -> None:
    for host in hosts or tuple(net.replicas):
        assert not net.replicas[host].engine.sessions


def test_drafts_right_and_wrong_commit_exactly_the_targets_text(network):
    net = network()
    result = generate(net, OracleDrafter(wrong={3, 17, 18, 40}))
    assert_exact(result)
    assert 0 < result.accepted_draft_tokens < result.draft_tokens
    assert result.rounds < len(TEXT) // 2  # accepted drafts commit several tokens a round
    assert result.resumed == result.failovers == result.chained_rounds == 0
    assert_no_sessions_left(net)


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_a_replica_that_dies_mid_generation_hands_over_to_the_other(network, pipelined):
    net = network("a", "b")

    def die_at_round_3(call: Call) -> None:
        if call.host == "a" and call.round == 3:
            net.dead.add("a")  # its answer to round 3 never left
            lose_answer(call)

    if pipelined:
        chain_behind_every_round(net)
    net.after.append(die_at_round_3)
    result = generate(net, pipelined=pipelined)
    assert_exact(result)
    assert result.failovers == 1 and result.resumed == 1
    b = net.replicas["b"]
    assert len(b.runner.prefilled) == 1 and b.engine.committed_tokens < len(TEXT)  # resumed, not restarted
    assert_no_sessions_left(net, "b")


def test_the_session_left_on_a_replica_that_comes_back_is_deleted_there(network):
    net = network("a", "b")

    def unreachable_at_round_3(call: Call) -> None:
        if call.host == "a" and call.round == 3:
            net.dead.add("a")  # a network partition: the replica lives on with the session
            lose_answer(call)

    def back_once_b_serves(call: Call) -> None:
        if call.host == "b":
            net.dead.discard("a")

    net.after.append(unreachable_at_round_3)
    net.before.append(back_once_b_serves)
    result = generate(net)
    assert_exact(result)
    assert result.failovers == 1
    assert_no_sessions_left(net)  # a's too: deleted when the generation ended


def test_chained_rounds_are_sent_and_commit_when_their_bets_hold(network):
    net = network()
    chain_behind_every_round(net)
    result = generate(net, pipelined=True)
    assert_exact(result)
    chained = [c for c in net.verify_calls() if c.chained]
    assert chained and result.chained_rounds >= len(chained) - 1  # the last bets on a finished round
    assert result.stale_rounds <= 1


def test_a_chained_round_whose_bet_lost_commits_nothing(network):
    """The look-ahead guesses wrong inside a chained round's bet: the agent sees it in the answer
    before, drops the chained round (the verifier answers it stale) and drafts afresh."""
    net = network()
    chain_behind_every_round(net)
    result = generate(net, OracleDrafter(wrong={6, 21, 33}), pipelined=True)
    assert_exact(result)
    # How many wrong guesses fall inside a chained round's bet depends on where drafts were cut.
    assert result.stale_rounds >= 1 and result.chained_rounds > 0


def test_a_chained_round_that_overtakes_the_round_it_bet_on_is_stale_and_sent_again(network):
    """The chained round reaches the verifier before the round it follows: stale, nothing
    committed; the agent sends the round again with a fresh draft."""
    net = network()

    def overtaken(call: Call) -> None:
        if call.plain and call.round == 1:
            net.wait("answered", call.session, 2)

    net.before.append(overtaken)
    chain_behind_every_round(net)
    result = generate(net, pipelined=True)
    assert_exact(result)
    stale = [c for c in net.verify_calls() if c.round == 2 and c.chained]
    assert stale and result.stale_rounds >= 1


def _lose_plain_answer(net: Network) -> None:
    """Round 1's answer is lost after the verifier committed it; the client's retry gets it again."""
    def after(call: Call) -> None:
        if net.first(call) and call.plain and call.round == 1 and call.attempt == 1:
            lose_answer(call)

    net.after.append(after)


def _lose_answer_behind_a_committed_chain(net: Network) -> None:
    """Round 1's answer is lost after the chained round 2 committed behind it: the retry of round 1
    comes after a later round (a verifier that replays only its last answer says 409)."""
    chain_behind_every_round(net)

    def after(call: Call) -> None:
        if net.first(call) and call.plain and call.round == 1 and call.attempt == 1:
            net.wait("answered", call.session, 2)
            lose_answer(call)

    net.after.append(after)


def _lose_chained_answer(net: Network) -> None:
    """The chained round 2 commits and its answer is lost; its retry gets it again."""
    chain_behind_every_round(net)

    def after(call: Call) -> None:
        if net.first(call) and call.round == 2 and call.chained and call.attempt == 1:
            lose_answer(call)

    net.after.append(after)


def _lose_stale_answer(net: Network) -> None:
    """The chained round 2 overtakes round 1 (stale) and its answer is lost; its retry arrives after
    round 1 committed, and commits."""
    chain_behind_every_round(net)

    def before(call: Call) -> None:
        if net.first(call) and call.plain and call.round == 1:
            net.wait("answered", call.session, 2)
        if net.first(call) and call.round == 2 and call.chained and call.attempt == 2:
            net.wait("answered", call.session, 1)

    def after(call: Call) -> None:
        if net.first(call) and call.round == 2 and call.chained and call.attempt == 1:
            lose_answer(call)

    net.before.append(before)
    net.after.append(after)


def _lose_request(net: Network) -> None:
    """Round 1's request is lost before the verifier saw it, after the chained round 2 arrived (stale);
    the retry of round 1 commits."""
    chain_behind_every_round(net)

    def before(call: Call) -> None:
        if net.first(call) and call.plain and call.round == 1 and call.attempt == 1:
            net.wait("answered", call.session, 2)
            raise httpx.WriteError("connection reset by peer", request=call.request)

    net.before.append(before)


@pytest.mark.parametrize("scenario,pipelined", [
    (_lose_plain_answer, False),
    (_lose_plain_answer, True),
    (_lose_answer_behind_a_committed_chain, True),
    (_lose_chained_answer, True),
    (_lose_stale_answer, True),
    (_lose_request, True),
], ids=["plain-answer", "pipelined-answer", "answer-behind-committed-chain", "chained-answer", "stale-answer",
        "request"])
def test_lost_requests_and_answers_lose_and_repeat_nothing(network, scenario, pipelined):
    net = network()
    scenario(net)
    result = generate(net, pipelined=pipelined)
    assert_exact(result)
    assert result.failovers == 0
    assert any(c.attempt == 2 for c in net.verify_calls())  # the scenario happened: a round was retried
    assert_no_sessions_left(net)


def test_an_unexpected_409_resumes_the_session_from_the_ids_held(network):
    """A verifier that cannot answer a round (409: a retry it no longer remembers) is still up: the
    agent rebuilds the session there from the ids it holds, and deletes the old one."""
    net = network()

    def conflict(call: Call) -> httpx.Response | None:  # the round committed; the device gets a 409
        if not (net.first(call) and call.round == 2):
            return None
        body = ErrorResponse(error=ErrorBody(code="conflict", message="round 2 is out of order: the next round is 4"))
        return httpx.Response(409, content=encode(body, True), headers={"content-type": MSGPACK})

    net.after.append(conflict)
    result = generate(net, OracleDrafter(wrong={10}))
    assert_exact(result)
    assert result.resumed == 1 and result.failovers == 0
    replica = net.replicas["a"]
    assert len(replica.runner.prefilled) == 2 and set(replica.runner.released) == set(replica.runner.prefilled)
    assert_no_sessions_left(net)


@pytest.mark.parametrize("pipelined", [False, True], ids=["plain", "pipelined"])
def test_a_cancelled_generation_stops_and_deletes_its_session(network, pipelined):
    net = network()
    if pipelined:
        chain_behind_every_round(net)
    cancel = threading.Event()
    with pytest.raises(GenerationCancelled):
        generate(net, pipelined=pipelined, cancel=cancel, on_text=lambda text: cancel.set())
    replica = net.replicas["a"]
    assert replica.runner.prefilled and replica.runner.released == replica.runner.prefilled
    assert_no_sessions_left(net)
    rounds = {c.round for c in net.verify_calls()}
    assert max(rounds) <= 2  # round 1 answered text; at most its chained round followed


def test_a_generation_cancelled_before_it_starts_sends_no_round(network):
    net = network()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled):
        generate(net, cancel=cancel)
    assert not net.verify_calls()
    assert_no_sessions_left(net)
