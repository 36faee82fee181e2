"""The device daemon through the official `openai` client: a real verifier and a real
`sled-agent serve` process on loopback (or the daemon's app under a real uvicorn in this process,
where a test needs its drafter or its configuration at hand); chat and text completions, streaming
and not, and the daemon's failures: cancelled requests, bad input, its API key."""
from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
import uvicorn

from edge_agent.client import VerifierError
from edge_agent.daemon import MAX_BODY_BYTES, DaemonConfig, create_daemon, no_verifier_answered
from edge_agent.drafting import DraftSource, NgramSource
from edge_agent.openai_api import ApiError
from shared.fleet import DeviceSettings, LocalApi, Retry, Verifier
from shared.protocol import MAX_STOP_BYTES, MAX_STOPS, Limits
from verifier_server.llama.reference import plain_reference
from verifier_server.lossless import NEAR_TIE_GAP
from verifier_server.process import AgentDaemonProcess, VerifierProcess, free_port

from conftest import LOSSLESS_REPORT
from huge_body import CHUNK, stream_into
from prompts import RAW

if TYPE_CHECKING:
    from edge_agent.drafter import Drafter

TARGET = "qwen2.5-coder-0.5b"
MAX = 48  # tokens per request in the failover test: long enough to be cut in the middle
DEAD = "http://127.0.0.1:9"  # nothing listens there: no verifier answers
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # continues to any max_tokens: a generation still running


@contextlib.contextmanager
def running_daemon(*options: str) -> Iterator[str]:
    """``sled-agent serve`` with ``options`` and SmolLM2 drafting; its base URL once healthy."""
    with AgentDaemonProcess("--drafter", "smollm2-135m", "--threads", "1", *options, startup_timeout_s=120) as d:
        yield d.url


@contextlib.contextmanager
def serving(config: DaemonConfig, drafters: list[Drafter | DraftSource | None]) -> Iterator[str]:
    """``create_daemon``'s app under a real uvicorn on loopback, in a thread; its base URL. The
    socket listens before the server starts, so early requests wait in its backlog: nothing
    polls for start-up."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(create_daemon(config, drafters), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def config_for(url: str, fallback: str = "none", context: int = 4096, **kw: Any) -> DaemonConfig:
    """A daemon's settings: the verifier at ``url``, no retries and a short deadline (a dead
    verifier fails at once), one generation at a time and room for four more to wait."""
    verifier = Verifier(urls=[url], timeout_s=120, retry=Retry(attempts=0, deadline_s=0.05))
    settings = DeviceSettings(fallback=fallback, context=context, api=LocalApi(concurrency=1, queue=4))
    return DaemonConfig(verifier, settings, TARGET, **kw)


@pytest.fixture(scope="module")
def target(verifier) -> VerifierProcess:
    return verifier(TARGET, "--slots", "4", "--ctx-per-slot", "1024")


@pytest.fixture(scope="module")
def daemon(target):
    server = target
    with running_daemon("--server", server.url, "--concurrency", "2", "--queue", "0") as url:
        yield url


def _judge_text(backend, ref, text: str) -> str:
    """The lossless rule on text (the OpenAI API returns no ids): identical to the reference, or
    first different inside a token where the reference was at a near-tie."""
    data = text.encode()
    if data == ref.text:
        return "identical"
    same = next((i for i, (a, b) in enumerate(zip(data, ref.text)) if a != b), min(len(data), len(ref.text)))
    end = 0
    for token, gap in zip(ref.ids, ref.gaps):
        end += len(backend.tokenizer.piece(token))
        if end > same:
            return "near_tie" if gap < NEAR_TIE_GAP else "diverged"
    return "diverged"


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.mark.slow
def test_chat_completion_streamed_equals_not_streamed(daemon):
    client = _client(daemon)
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    whole = client.chat.completions.create(model=TARGET, messages=messages, max_tokens=24)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens > 0
    assert whole.model_extra["sled"]["rounds"] >= 1
    chunks = list(client.chat.completions.create(model=TARGET, messages=messages, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 24


@pytest.mark.slow
def test_text_completion_and_seeded_sampling(daemon):
    client = _client(daemon)
    first = client.completions.create(model=TARGET, prompt="def fibonacci(n):\n", max_tokens=16,
                                      temperature=0.8, seed=11)
    again = "".join(c.choices[0].text for c in client.completions.create(
        model=TARGET, prompt="def fibonacci(n):\n", max_tokens=16, temperature=0.8, seed=11, stream=True))
    assert again == first.choices[0].text  # the same seed, the same sample, streamed or not
    assert first.model_extra["sled"]["seed"] == 11


@pytest.mark.slow
def test_models_health_and_metrics(daemon):
    assert [m.id for m in _client(daemon).models.list()] == [TARGET]
    metrics = httpx.get(f"{daemon}/metrics").text
    assert "sled_agent_requests_total" in metrics and "sled_agent_round_seconds" in metrics


@pytest.mark.slow
def test_unsupported_and_bad_fields_get_openai_errors(daemon):
    client = _client(daemon)
    messages = [{"role": "user", "content": "hi"}]
    for extra in ({"n": 2}, {"logprobs": True}, {"tools": [{"type": "function", "function": {"name": "f"}}]},
                  {"temperature": -1}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=TARGET, messages=messages, max_tokens=4, **extra)
        assert next(iter(extra)) in str(err.value)
    # unknown harmless fields are ignored
    ok = client.chat.completions.create(model=TARGET, messages=messages, max_tokens=2, extra_body={"user_tag": "x"})
    assert ok.usage.completion_tokens == 2


@pytest.mark.slow
def test_more_requests_than_the_daemon_takes_get_a_429(daemon):
    client = httpx.Client(base_url=f"{daemon}/v1", timeout=120)
    body = {"model": TARGET, "prompt": "Once upon a time", "max_tokens": 48, "stream": True}
    with client.stream("POST", "/completions", json=body) as a, client.stream("POST", "/completions", json=body) as b:
        # A stream's first chunk leaves once it holds a drafter: both generating (concurrency 2, queue 0).
        assert next(a.iter_lines()).startswith("data: ") and next(b.iter_lines()).startswith("data: ")
        r = client.post("/completions", json={**body, "stream": False})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"


@pytest.mark.slow
def test_without_a_verifier_the_daemon_fails_clearly_or_falls_back_visibly():
    dead = ["--server", "http://127.0.0.1:9", "--deadline", "1", "--concurrency", "1"]
    messages = [{"role": "user", "content": "Say hello."}]
    with running_daemon(*dead) as url:
        with pytest.raises(openai.InternalServerError) as err:
            _client(url).chat.completions.create(model=TARGET, messages=messages, max_tokens=8)
        assert err.value.status_code == 503 and "no verifier answered" in str(err.value)
    with running_daemon(*dead, "--fallback", "local") as url:
        raw = _client(url).chat.completions.with_raw_response.create(model=TARGET, messages=messages, max_tokens=8)
        answer = raw.parse()
        assert raw.headers["x-sled-fallback"] == "local"
        assert answer.system_fingerprint == "sled-local-fallback" and answer.choices[0].message.content


@pytest.mark.slow
def test_a_killed_replica_behind_the_daemon_loses_no_request(reference_backend):
    """Four streamed local requests through the daemon; once all are generating, the verifier that
    holds sessions is killed."""
    replicas = [VerifierProcess(TARGET, "--slots", "4", "--ctx-per-slot", "1024", threads=1) for _ in range(2)]
    prompts = RAW[:4]
    try:
        servers = [opt for r in replicas for opt in ("--server", r.url)]
        with running_daemon(*servers, "--concurrency", "4", "--deadline", "20") as url:
            client = _client(url)

            started = [threading.Event() for _ in prompts]

            def complete(i: int) -> str:
                text = ""
                for chunk in client.completions.create(model=TARGET, prompt=prompts[i], max_tokens=MAX, stream=True):
                    text += chunk.choices[0].text if chunk.choices else ""
                    if text:
                        started[i].set()
                return text

            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(complete, i) for i in range(4)]
                for event in started:  # every request is generating now
                    assert event.wait(120)
                busiest = max(replicas, key=lambda r: r.stats()["sessions"])
                busiest.proc.send_signal(signal.SIGKILL)  # the replica that holds sessions
                texts = [f.result() for f in futures]
            metrics = httpx.get(f"{url}/metrics").text
    finally:
        for r in replicas:
            r.stop()
    backend = reference_backend(TARGET)
    kinds = [_judge_text(backend, plain_reference(backend, backend.tokenizer.prompt_ids(p, None), MAX), t)
             for p, t in zip(prompts, texts)]
    LOSSLESS_REPORT.append(f"daemon failover (replica killed, 4 local requests): {kinds}")
    assert "diverged" not in kinds, kinds
    failovers = float(re.search(r"^sled_agent_failovers_total (\S+)$", metrics, re.M).group(1))
    assert failovers >= 1, "no session moved"


# --- the daemon's failures: cancelled requests, bad input, its API key -----------------------------

LIMITS = Limits(max_draft_bytes=4096, max_draft_tokens=64, max_context_tokens=512, max_sessions=64,
                sequence_slots=4, max_parked_bytes=0)
MESSAGES = [{"role": "user", "content": "Write a Python function that reverses a string."}]


@pytest.fixture(scope="module")
def offline() -> Iterator[str]:
    """A daemon with no drafter whose verifier never answers, but whose limits it was told at
    start (as ``sled-agent serve`` asks them): what it refuses, it refuses before any generation."""
    with serving(config_for(DEAD, verifier_limits=LIMITS), [None]) as url:
        yield url


class DrafterUse:
    """Watches a real drafter: which threads use it, in order, and how many at once (a llama.cpp
    context used by two threads corrupts memory). ``started`` is set when a generation starts on it."""

    def __init__(self, drafter: Drafter, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Lock()
        self.inside = self.most = 0
        self.threads: list[int] = []
        self.started = threading.Event()
        for name in ("start", "greedy"):
            monkeypatch.setattr(drafter, name, self._watched(getattr(drafter, name)))

    def _watched(self, method: Any) -> Any:
        def watched(*args: Any, **kw: Any) -> Any:
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
                self.threads.append(threading.get_ident())
            self.started.set()
            try:
                return method(*args, **kw)
            finally:
                with self.lock:
                    self.inside -= 1

        return watched

    def interleaved(self) -> bool:
        """Whether a thread used the drafter again after another had used it since."""
        runs = [thread for thread, _ in itertools.groupby(self.threads)]
        return len(runs) != len(set(runs))


class BreaksAfterFirstRound(NgramSource):
    """A draft source that fails once the first round's text has gone out: a fault inside the
    device, neither the request's nor the verifier's."""

    def commit(self, text: bytes) -> None:
        raise RuntimeError("the draft source broke")


def _events(response: httpx.Response) -> Iterator[str]:
    """A stream's server-sent events, as they arrive."""
    return (line.removeprefix("data: ") for line in response.iter_lines() if line)


def _sessions(server: VerifierProcess) -> int:
    return httpx.get(f"{server.url}/v1/health", timeout=30).json()["sessions"]


@pytest.mark.slow
def test_a_disconnected_stream_stops_and_frees_its_drafter_only_when_done(target, drafter, monkeypatch):
    """A streaming client goes away mid-generation and a second request follows at once: the
    first stops at its next round and deletes its session, and only then does the second get the
    drafter (before, the drafter went back to the pool while the first thread still drafted with
    it, and the first session ran on to max_tokens)."""
    model = drafter("smollm2-135m")
    use = DrafterUse(model, monkeypatch)
    second = {"model": TARGET, "messages": MESSAGES, "max_tokens": 24}
    with serving(config_for(target.url), [model]) as url:
        client = _client(url)
        alone = client.chat.completions.create(**second).choices[0].message.content
        committed = target.stats()["committed_tokens"]
        body = {"model": TARGET, "prompt": COUNTING, "max_tokens": 600, "stream": True}
        with httpx.Client(base_url=f"{url}/v1", timeout=120) as first, first.stream("POST", "/completions", json=body) as r:
            texts = (json.loads(e)["choices"][0]["text"] for e in _events(r) if e.startswith("{"))
            assert any(texts)  # generating; leaving the block disconnects
        after = client.chat.completions.create(**second).choices[0].message.content
        assert _sessions(target) == 0  # the first session is gone, not running on to 600 tokens
        assert target.stats()["committed_tokens"] - committed < 600
    assert after == alone
    assert use.most == 1 and not use.interleaved(), use.threads


@pytest.mark.slow
def test_a_non_streamed_request_whose_client_goes_away_stops_its_generation(target, drafter, monkeypatch):
    """Before, a non-streamed generation ran on to max_tokens for a client long gone, holding the
    drafter and the verifier the whole time."""
    use = DrafterUse(drafter("smollm2-135m"), monkeypatch)
    with serving(config_for(target.url), [drafter("smollm2-135m")]) as url:
        committed = target.stats()["committed_tokens"]
        body = json.dumps({"model": TARGET, "prompt": COUNTING, "max_tokens": 600}).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
        with socket.create_connection(("127.0.0.1", httpx.URL(url).port)) as raw:
            raw.sendall(head.encode() + b"\r\n\r\n" + body)
            assert use.started.wait(120)  # generating; the client goes away
        answer = _client(url).completions.create(model=TARGET, prompt="def add(a, b):\n", max_tokens=8)
        metrics = httpx.get(f"{url}/metrics").text
    assert answer.choices[0].text
    assert target.stats()["committed_tokens"] - committed < 600  # the first stopped early
    assert re.search(r'^sled_agent_requests_total\{endpoint="/v1/completions",status="499"\} 1\.0$', metrics, re.M)
    assert not use.interleaved()


@pytest.mark.slow
def test_a_failure_mid_stream_ends_it_with_an_error_chunk_and_done(target):
    """Before, any exception but an ApiError or a VerifierError cut the stream: no error event,
    no [DONE]."""
    with serving(config_for(target.url), [BreaksAfterFirstRound()]) as url, httpx.stream(
            "POST", f"{url}/v1/chat/completions", json={"model": TARGET, "messages": MESSAGES, "max_tokens": 24,
                                                       "stream": True}, timeout=120) as r:
        events = list(_events(r))
    assert r.status_code == 200 and events[-1] == "[DONE]", events
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert any(json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2])  # text went out first


@pytest.mark.slow
def test_the_local_fallback_never_hides_a_verifier_refusal(target, drafter):
    """A prompt longer than the verifier's context gets the verifier's 413, not drafter-only text
    (before, ``fallback: local`` answered every VerifierError); the drafter's own context bounds
    max_tokens too."""
    with serving(config_for(target.url, fallback="local", context=512), [drafter("smollm2-135m")]) as url:
        client = _client(url)
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model=TARGET, prompt="word " * 1200, max_tokens=8)
        with pytest.raises(openai.BadRequestError) as too_many:
            client.completions.create(model=TARGET, prompt="Hello", max_tokens=513)
    assert refused.value.status_code == 413 and "context" in refused.value.message
    assert too_many.value.param == "max_tokens" and "512" in too_many.value.message


@pytest.mark.slow
def test_max_tokens_beyond_the_verifiers_context_is_a_400(target):
    """The daemon asks the verifier's limits (/v1/info) itself when it was not told them; before,
    any max_tokens went on to the verifier and came back as a 413."""
    with serving(config_for(target.url), [None]) as url:
        client = _client(url)
        for field in ("max_tokens", "max_completion_tokens"):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model=TARGET, messages=MESSAGES, **{field: 1025})
            assert err.value.param == field and "1024" in err.value.message
        assert client.chat.completions.create(model=TARGET, messages=MESSAGES, max_tokens=4).usage.completion_tokens


@pytest.mark.parametrize(("stop", "why"), [
    (["x"] * (MAX_STOPS + 1), f"at most {MAX_STOPS}"),
    ([""], "must not be empty"),
    ("é" * (MAX_STOP_BYTES // 2 + 1), f"{MAX_STOP_BYTES} bytes"),
])
def test_bad_stop_strings_get_a_400_naming_stop(offline, stop, why):
    """Before, they reached the session request and came back as a 500."""
    with pytest.raises(openai.BadRequestError) as err:
        _client(offline).completions.create(model=TARGET, prompt="hi", max_tokens=4, stop=stop)
    assert err.value.param == "stop" and why in err.value.message


def test_the_most_stop_strings_allowed_pass_to_the_verifier(offline):
    with pytest.raises(openai.InternalServerError) as err:  # no verifier: a 503, not a 400
        _client(offline).completions.create(model=TARGET, prompt="hi", max_tokens=4,
                                            stop=["é" * (MAX_STOP_BYTES // 2)] * MAX_STOPS)
    assert err.value.status_code == 503


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_beyond_the_context_is_a_400_naming_the_field(offline, field):
    client = _client(offline)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=TARGET, messages=MESSAGES, **{field: LIMITS.max_context_tokens + 1})
    assert err.value.param == field and str(LIMITS.max_context_tokens) in err.value.message
    with pytest.raises(openai.InternalServerError):  # at the limit it goes on (to a verifier that never answers)
        client.chat.completions.create(model=TARGET, messages=MESSAGES, **{field: LIMITS.max_context_tokens})


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ("/v1/completions", {"prompt": ["one", "two"]}, "prompt"),
])
def test_bad_input_in_a_stream_is_a_400_before_it_starts(offline, path, body, field):
    """Before, the stream had started (200) by the time the prompt was read: the 400 came as a chunk."""
    r = httpx.post(f"{offline}{path}", json={"model": TARGET, "stream": True, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


@pytest.mark.parametrize(("status", "falls_back"), [(0, True), (500, True), (503, True), (400, False),
                                                    (401, False), (404, False), (413, False), (429, False)])
def test_the_local_fallback_answers_only_when_no_verifier_did(status, falls_back):
    assert no_verifier_answered(VerifierError("verifier: ...", status)) is falls_back


@pytest.mark.parametrize(("status", "answered"), [(0, 503), (503, 503), (404, 503), (401, 502), (403, 502),
                                                  (413, 413), (429, 429)])
def test_a_verifier_error_reaches_the_app_with_a_status_of_its_own(status, answered):
    """A refused device token is a 502: a 401 would tell the app that its own key is wrong."""
    assert ApiError.from_verifier(VerifierError("verifier: ...", status)).status == answered


def test_an_api_key_guards_everything_but_healthz():
    with serving(config_for(DEAD, api_key="s3cret-key"), [None]) as url:
        with pytest.raises(openai.AuthenticationError) as wrong:
            openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-key", max_retries=0).models.list()
        assert wrong.value.code == "invalid_api_key"
        for path in ("/v1/models", "/metrics"):
            bare = httpx.get(f"{url}{path}")  # no Authorization header at all
            assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES}).status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret-key", max_retries=0)
        assert [m.id for m in right.models.list()] == [TARGET]


def _serve_cli(*flags: str) -> subprocess.CompletedProcess[str]:
    argv = ["serve", "--port", str(free_port()), "--drafter", "ngram", "--server", DEAD, *flags]
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *argv], capture_output=True, text=True, timeout=30)


def test_serve_refuses_to_listen_beyond_loopback_without_an_api_key(tmp_path: Path):
    """Before, ``--host 0.0.0.0`` served an open API to the network (here: a timeout)."""
    refused = _serve_cli("--host", "0.0.0.0")
    assert refused.returncode == 1, refused.stderr
    assert "--api-key-file" in refused.stderr and "--insecure-listen" in refused.stderr
    assert "Traceback" not in refused.stderr
    empty = tmp_path / "api.key"
    empty.write_text("\n")
    unusable = _serve_cli("--host", "0.0.0.0", "--api-key-file", str(empty))
    assert unusable.returncode == 1 and "is empty" in unusable.stderr and "Traceback" not in unusable.stderr


def test_a_huge_streamed_body_is_refused_without_being_read_whole():
    """A 50 MB chunked request: a 413 in OpenAI's format once past the daemon's limit, not 50 MB held."""
    app = create_daemon(config_for(DEAD), [None])
    status, body, read = stream_into(app, "/v1/chat/completions")
    assert status == 413 and json.loads(body)["error"]["message"].startswith("request body exceeds the limit")
    assert read <= MAX_BODY_BYTES + CHUNK
