"""The device daemon through the official `openai` client: a real verifier and a real
`sled-agent serve` process on loopback; chat and text completions, streaming and not."""
from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from verifier_server.llama.reference import plain_reference
from verifier_server.lossless import NEAR_TIE_GAP
from verifier_server.process import AgentDaemonProcess, VerifierProcess

from conftest import LOSSLESS_REPORT
from prompts import RAW

TARGET = "qwen2.5-coder-0.5b"
MAX = 48  # tokens per request in the failover test: long enough to be cut in the middle
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def running_daemon(*options: str) -> Iterator[str]:
    """``sled-agent serve`` with ``options`` and SmolLM2 drafting; its base URL once healthy."""
    with AgentDaemonProcess("--drafter", "smollm2-135m", "--threads", "1", *options, startup_timeout_s=120) as d:
        yield d.url


@pytest.fixture(scope="module")
def daemon(verifier):
    server = verifier(TARGET, "--slots", "4", "--ctx-per-slot", "1024")
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


def test_text_completion_and_seeded_sampling(daemon):
    client = _client(daemon)
    first = client.completions.create(model=TARGET, prompt="def fibonacci(n):\n", max_tokens=16,
                                      temperature=0.8, seed=11)
    again = "".join(c.choices[0].text for c in client.completions.create(
        model=TARGET, prompt="def fibonacci(n):\n", max_tokens=16, temperature=0.8, seed=11, stream=True))
    assert again == first.choices[0].text  # the same seed, the same sample, streamed or not
    assert first.model_extra["sled"]["seed"] == 11


def test_models_health_and_metrics(daemon):
    assert [m.id for m in _client(daemon).models.list()] == [TARGET]
    metrics = httpx.get(f"{daemon}/metrics").text
    assert "sled_agent_requests_total" in metrics and "sled_agent_round_seconds" in metrics


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


def test_more_requests_than_the_daemon_takes_get_a_429(daemon):
    client = httpx.Client(base_url=f"{daemon}/v1", timeout=120)
    body = {"model": TARGET, "prompt": "Once upon a time", "max_tokens": 48, "stream": True}
    with client.stream("POST", "/completions", json=body), client.stream("POST", "/completions", json=body):
        time.sleep(0.5)  # both generating: concurrency 2, queue 0
        r = client.post("/completions", json={**body, "stream": False})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"


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
