"""Network faults between a real agent and a real verifier, measured: a small asyncio HTTP/1.1
proxy on loopback delays every request and, at random (a fixed seed), resets the connection before
forwarding a request, cuts it after forwarding one (the verifier may still be working on it when
the retry arrives), or drops the answer after the verifier gave it (the round committed there, the
device never heard). Plain, adaptive and pipelined agents (whose chained rounds then meet lost
answers) run ``SLED_FAULT_GENERATIONS`` short generations through it (default 24; the long run is
100): every one must complete, and its ids and text follow the lossless rule against the target's
plain output, nothing duplicated, nothing lost.

    SLED_FAULT_GENERATIONS=100 python -m pytest tests/test_network_faults.py -s
"""
from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import threading
import time
from collections import Counter

import httpx
import pytest

from edge_agent.agent import Agent, GenerationResult
from edge_agent.client import VerifierClient
from shared.codec import MSGPACK, decode
from shared.protocol import VerifyRequest
from shared.utf8 import complete_prefix_len
from verifier_server.llama.reference import plain_reference
from verifier_server.lossless import judge

from conftest import LOSSLESS_REPORT
from prompts import RAW

TARGET = "qwen2.5-coder-0.5b"
DRAFTER = "smollm2-135m"
MAX_TOKENS = 16
GENERATIONS = int(os.environ.get("SLED_FAULT_GENERATIONS", "24"))
SEED = int(os.environ.get("SLED_FAULT_SEED", "17"))
# Per request: the chance of each fault, and the most latency added to every request.
FAULTS = {"reset": 0.04, "cut": 0.04, "drop": 0.06}
MAX_DELAY_S = 0.02
pytestmark = pytest.mark.slow


class Message:
    """One HTTP/1.1 message read off a stream: its head and body, as bytes to pass on."""

    def __init__(self, head: bytes, body: bytes) -> None:
        self.head, self.body = head, body

    @property
    def raw(self) -> bytes:
        return self.head + self.body

    @property
    def start_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    def what(self) -> str:
        """What a request is, for the fault counts: a session's creation, a round (``chained``:
        sent before the answers it follows), a deletion, or anything else."""
        method, path = self.start_line.split()[:2]
        if path.endswith("/verify"):
            return "chained" if decode(self.body, MSGPACK, VerifyRequest).chained else "round"
        if path.endswith("/sessions") and method == "POST":
            return "create"
        return "delete" if method == "DELETE" else "other"


async def read_message(reader: asyncio.StreamReader, response_to: str | None = None) -> Message | None:
    """The next request (or, with ``response_to``, the response to that request line) on
    ``reader``; None when the peer closed between messages. Bodies by Content-Length."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ConnectionError("the connection closed inside a message head") from None
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if response_to is not None:
        status = int(lines[0].split()[1])
        if status < 200 or status in (204, 304) or response_to.startswith("HEAD "):
            return Message(head, b"")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise ValueError("chunked bodies: neither httpx's requests nor the verifier's answers use them")
    return Message(head, await reader.readexactly(int(headers.get("content-length", "0"))))


class FaultyProxy:
    """Forwards HTTP/1.1 from ``url`` to a verifier on loopback, one upstream connection per client
    connection, on an event loop of its own thread, injecting faults per request (counted in
    ``faults`` by kind)."""

    def __init__(self, upstream_port: int, seed: int) -> None:
        self.upstream_port = upstream_port
        self.rng = random.Random(seed)  # used on the proxy's loop only
        self.faults: Counter[str] = Counter()
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10), "the proxy did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def _fault(self) -> str | None:
        draw = self.rng.random()
        for kind, p in FAULTS.items():
            if draw < p:
                return kind
            draw -= p
        return None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        reset = False
        try:
            while (request := await read_message(reader)) is not None:
                self.requests += 1
                fault = self._fault()
                await asyncio.sleep(self.rng.uniform(0, MAX_DELAY_S))  # latency on the link
                if fault is not None:
                    self.faults[fault] += 1
                    self.faults[f"{fault} {request.what()}"] += 1
                if fault == "reset":  # before the verifier saw the request
                    reset = True
                    return
                if upstream is None:
                    upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
                upstream[1].write(request.raw)
                await upstream[1].drain()
                if fault == "cut":  # the verifier has the request; nobody waits for its answer
                    return
                response = await read_message(upstream[0], request.start_line)
                if response is None:
                    return
                if fault == "drop":  # the round committed there; the device never hears
                    return
                writer.write(response.raw)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if reset:  # an RST, not a FIN: SO_LINGER with a zero timeout
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            if upstream is not None:
                upstream[1].close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def replayed_rounds(url: str) -> float:
    """Rounds the verifier answered again to a retry, from its Prometheus counters."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sled:rounds_total{") and 'outcome="replayed"' in line)


# The mix of agents: each generation goes to the next one in turn.
AGENTS = {
    "plain": {"draft_tokens": 4, "follow_hint": False},
    "adaptive+pipelined": {"adaptive": True, "pipelined": True},
    "pipelined": {"draft_tokens": 4, "follow_hint": False, "pipelined": True},
}


def test_faults_on_the_network_lose_and_repeat_nothing(verifier, drafter, reference_backend):
    server = verifier(TARGET, "--slots", "2", "--ctx-per-slot", "1024")
    backend = reference_backend(TARGET)
    tok = backend.tokenizer
    references = {}
    proxy = FaultyProxy(server.port, SEED)
    counts: Counter[str] = Counter()
    failures: list[str] = []
    totals: Counter[str] = Counter()
    replayed_before = replayed_rounds(server.url)
    t0 = time.perf_counter()
    try:
        with VerifierClient(proxy.url, timeout_s=30, retries=3, backoff_s=0.02) as client:
            agents = {name: Agent(client, drafter(DRAFTER), deadline_s=30, **options)
                      for name, options in AGENTS.items()}
            for i in range(GENERATIONS):
                name = list(AGENTS)[i % len(AGENTS)]
                prompt = RAW[i % len(RAW)]
                label = f"#{i} {name} {prompt[:20]!r}"
                try:
                    result: GenerationResult = agents[name].generate(prompt, max_tokens=MAX_TOKENS)
                except Exception as e:  # every generation must complete: count and report, then fail
                    failures.append(f"{label}: {type(e).__name__}: {e}")
                    continue
                if prompt not in references:
                    references[prompt] = plain_reference(backend, tok.prompt_ids(prompt, None), MAX_TOKENS)
                ref = references[prompt]
                verdict = judge(result.ids, ref)
                counts[verdict.kind] += 1
                pieces = b"".join(tok.piece(t) for t in result.ids)
                if verdict.kind == "diverged":
                    failures.append(f"{label}: diverged at token {verdict.position} (gap {verdict.gap:.3f})")
                if len(result.ids) != len(ref.ids):
                    failures.append(f"{label}: {len(result.ids)} ids committed, the reference has {len(ref.ids)}")
                if result.text != pieces[: complete_prefix_len(pieces)]:
                    failures.append(f"{label}: the text is not the text of the ids: {result.text!r} / {pieces!r}")
                if verdict.kind == "identical" and result.text != ref.text[: len(result.text)]:
                    failures.append(f"{label}: the text differs from the reference's: {result.text!r}")
                totals.update(rounds=result.rounds, chained=result.chained_rounds, stale=result.stale_rounds,
                              resumed=result.resumed, failovers=result.failovers)
    finally:
        proxy.close()
    wall = time.perf_counter() - t0
    replayed = replayed_rounds(server.url) - replayed_before
    faults = "; ".join(f"{proxy.faults[k]} {k} (" + ", ".join(
        f"{n} {what.split()[1]}" for what, n in sorted(proxy.faults.items()) if what.startswith(f"{k} ")) + ")"
        for k in FAULTS)
    LOSSLESS_REPORT.append(
        f"network faults ({GENERATIONS} generations of {MAX_TOKENS} tokens, seed {SEED}, {proxy.requests} requests; "
        f"faults: {faults}; latency 0-{MAX_DELAY_S * 1e3:.0f} ms): {len(failures)} failures, "
        f"{counts['identical']} identical, {counts['near_tie']} near-tie, {counts['diverged']} diverged; "
        f"{totals['rounds']} rounds, {totals['chained']} chained, {totals['stale']} stale, "
        f"{totals['resumed']} resumed, {totals['failovers']} failovers, {replayed:.0f} answers replayed by the "
        f"verifier; {wall:.0f} s")
    print(LOSSLESS_REPORT[-1])
    assert not failures, failures
    assert all(proxy.faults[k] > 0 for k in FAULTS), proxy.faults  # each kind of fault happened
    assert totals["chained"] > 0  # pipelined agents had chained rounds in flight among the faults
