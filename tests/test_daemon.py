"""The device daemon through the official `openai` client: a real verifier and a real
`sled-agent serve` process on loopback; chat and text completions, streaming and not."""
from __future__ import annotations

import sys
import time

import httpx
import openai
import pytest

from verifier_server.process import free_port, spawn, stop

TARGET = "qwen2.5-coder-0.5b"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(verifier):
    server = verifier(TARGET, "--slots", "4", "--ctx-per-slot", "1024")
    port = free_port()
    proc = spawn([sys.executable, "-m", "edge_agent.cli", "serve", "--server", server.url, "--drafter", "smollm2-135m",
                  "--threads", "1", "--port", str(port), "--concurrency", "2", "--queue", "0"], None)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the daemon exited"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url
    stop(proc)


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
