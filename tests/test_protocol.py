"""The verifier's HTTP protocol against a real server: rounds, retries, recovery and bad input."""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import httpx
import msgpack
import pytest

from edge_agent.agent import Agent
from edge_agent.client import VerifierClient, VerifierError
from shared.codec import decode
from shared.protocol import ErrorResponse, SessionCreate
from shared.sampling import Sampling
from verifier_server.llama.reference import plain_reference
from verifier_server.lossless import judge

from conftest import ROOT

TARGET = "qwen2.5-coder-0.5b"
PROMPT = "def is_prime(n):\n"
MSGPACK = {"content-type": "application/msgpack", "accept": "application/msgpack"}
pytestmark = pytest.mark.slow  # a real verifier process on a real model


@pytest.fixture(scope="module")
def server(verifier):
    return verifier(TARGET, "--slots", "2", "--ctx-per-slot", "1024")


def _post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url, content=msgpack.packb(body, use_bin_type=True), headers=MSGPACK, timeout=60)


def _verify(server, sid: str, rnd: int, draft: bytes = b"") -> dict:
    r = _post(f"{server.url}/v1/sessions/{sid}/verify", {"round": rnd, "draft": draft})
    assert r.status_code == 200, r.content
    return msgpack.unpackb(r.content)


def _create(server, **body) -> str:
    r = _post(f"{server.url}/v1/sessions", {"prompt": PROMPT, "max_tokens": 24, **body})
    assert r.status_code == 201, r.content
    return msgpack.unpackb(r.content)["session_id"]


def test_info_describes_the_target(server):
    info = httpx.get(f"{server.url}/v1/info").json()
    assert info["model"] == TARGET and info["n_vocab"] == 151936
    assert info["tokenizer"] == "byte-level BPE" and info["protocol_version"] == 1
    assert info["limits"]["sequence_slots"] == 2


def test_retried_round_returns_the_same_answer(server):
    sid = _create(server)
    first = _verify(server, sid, 1, b"    if n < 2")
    again = _verify(server, sid, 1, b"    if n < 2")
    assert again == first
    second = _verify(server, sid, 2)
    # nothing was committed twice: the second round continues right after the first
    assert second["committed_tokens"] == first["committed_tokens"] + len(second["ids"])
    r = _post(f"{server.url}/v1/sessions/{sid}/verify", {"round": 5, "draft": b""})
    assert r.status_code == 409 and b"next round is 3" in r.content


def test_recovery_from_committed_ids_gives_the_same_output(server, reference_backend):
    with VerifierClient(server.url) as client:
        full = Agent(client, None).generate(PROMPT, max_tokens=24)
        # a first replica commits some rounds, then disappears
        created = client.create_session(SessionCreate(prompt=PROMPT, max_tokens=24))
        text, ids = b"", []
        for rnd in range(1, 9):
            resp = client.verify(created.session_id, rnd, b"")
            text, ids = text + resp.text, ids + resp.ids
        client.delete_session(created.session_id)
        # another replica rebuilds the session from the ids alone and finishes the generation
        resumed = client.create_session(SessionCreate(prompt=PROMPT, max_tokens=24, resume_ids=ids))
        rnd = 1
        while True:
            resp = client.verify(resumed.session_id, rnd, b"")
            text, ids, rnd = text + resp.text, ids + resp.ids, rnd + 1
            if resp.finished:
                break
    # Rebuilt in one batch, the KV may differ in the last bits: same output, or a first
    # difference only at a near-tie of the target (the lossless rule).
    if ids != full.ids:
        backend = reference_backend(TARGET)
        ref = plain_reference(backend, backend.tokenizer.prompt_ids(PROMPT, None), 24)
        assert judge(ids, ref).kind == "near_tie", (ids, full.ids)
    else:
        assert text == full.text


def test_a_sampled_session_replays_through_a_retry_and_a_resume(server, reference_backend):
    """Seeded sampling (SLEM): retried rounds and a rebuild from ids on another replica continue
    the very sample that plain seeded sampling of the target draws."""
    sampled = {"temperature": 0.7, "seed": 1234}
    with VerifierClient(server.url) as client:
        created = client.create_session(SessionCreate(prompt=PROMPT, max_tokens=24, **sampled))
        assert created.seed == 1234
        first = client.verify(created.session_id, 1, b"    if n <= 1")
        assert client.verify(created.session_id, 1, b"    if n <= 1") == first  # a retry
        ids = list(first.ids)
        for rnd in range(2, 5):
            ids += client.verify(created.session_id, rnd, b"    return").ids
        client.delete_session(created.session_id)
        resumed = client.create_session(SessionCreate(prompt=PROMPT, max_tokens=24, resume_ids=ids, **sampled))
        rnd = 1
        while True:
            resp = client.verify(resumed.session_id, rnd, b"")
            ids, rnd = ids + resp.ids, rnd + 1
            if resp.finished:
                break
        unseeded = client.create_session(SessionCreate(prompt=PROMPT, max_tokens=4, temperature=1.0))
        greedy = client.create_session(SessionCreate(prompt=PROMPT, max_tokens=4))
    assert unseeded.seed is not None and greedy.seed is None
    backend = reference_backend(TARGET)
    ref = plain_reference(backend, backend.tokenizer.prompt_ids(PROMPT, None), 24, Sampling(0.7), 1234)
    assert judge(ids, ref).kind != "diverged", (ids, ref.ids)


def test_json_bodies_are_accepted(server):
    r = httpx.post(f"{server.url}/v1/sessions", json={"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 201
    sid = r.json()["session_id"]
    draft = base64.b64encode(b"    if").decode()
    r = httpx.post(f"{server.url}/v1/sessions/{sid}/verify", json={"round": 1, "draft": draft})
    assert r.status_code == 200 and r.json()["committed_tokens"] >= 1
    assert base64.b64decode(r.json()["text"]).startswith(b"    ")


def _error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, (r.status_code, r.content)
    message = decode(r.content, r.headers["content-type"], ErrorResponse).error.message
    assert words in message, message


def test_bad_input_gets_clear_errors_and_others_keep_being_served(server):
    sid = _create(server)
    first = _verify(server, sid, 1)
    url = server.url + "/v1/sessions"
    json_hdr = {"content-type": "application/json"}
    _error(httpx.post(url, content=b"\xc1\xff", headers={"content-type": "application/msgpack"}), 400, "malformed msgpack")
    _error(httpx.post(url, content=b"{not json", headers=json_hdr), 400, "JSON")
    _error(httpx.post(url, content=b'{"prompt": "\xff\xfe"}', headers=json_hdr), 400, "invalid")
    _error(httpx.post(url, content=msgpack.packb({"prompt": b"\xff"}, use_bin_type=False),
                      headers={"content-type": "application/msgpack"}), 400, "malformed msgpack")
    _error(httpx.post(url, json={"max_tokens": 3}), 400, "exactly one of 'prompt'")
    _error(httpx.post(url, json={"prompt": "x", "max_tokens": 0}), 400, "max_tokens")
    _error(httpx.post(url, json={"prompt": "x", "resume_ids": [10**9]}), 400, "outside the vocabulary")
    for field, value in (("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("min_p", 2), ("top_k", -1), ("seed", -3)):
        _error(httpx.post(url, json={"prompt": "x", field: value}), 400, field)
    _error(httpx.post(f"{url}/nope/verify", json={"round": 1}), 404, "unknown session")
    big = base64.b64encode(b"x" * 5000).decode()
    _error(httpx.post(f"{url}/{sid}/verify", json={"round": 2, "draft": big}), 413, "exceeds the limit")
    # malformed TLI rounds
    sampled = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0}).json()["session_id"]
    tli = f"{url}/{sampled}/verify"
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    q = {"ids": [262], "probs": [1.0]}
    _error(httpx.post(tli, json={"round": 1, "draft_ids": [262]}), 400, "both 'draft_ids' and 'proposals'")
    _error(httpx.post(tli, json={"round": 1, "draft_ids": [262, 262], "proposals": [q]}), 400, "2 draft_ids but 1 proposals")
    _error(httpx.post(tli, json={"round": 1, "draft_ids": [262], "proposals": [{"ids": [262, 5], "probs": [0.5, 0.2]}]}),
           400, "sum to 1")
    _error(httpx.post(tli, json={"round": 1, "draft_ids": [262], "proposals": [{"ids": [5], "probs": [1.0]}]}),
           400, "has no probability")
    _error(httpx.post(tli, json={"round": 1, "draft_ids": [10**9], "proposals": [{"ids": [10**9], "probs": [1.0]}],
                                 "draft": b64(b"")}), 400, "outside the vocabulary")
    _error(httpx.post(tli, json={"round": 1, "draft_ids": [262], "proposals": [q], "draft": b64(b"zz")}), 400,
           "bytes of 'draft_ids'")
    _error(httpx.post(f"{url}/{sid}/verify", json={"round": 2, "draft_ids": [262], "proposals": [q], "draft": b64(b"  ")}),
           400, "needs a sampled session")
    # the session in progress is untouched and carries on
    second = _verify(server, sid, 2)
    assert second["round"] == 2 and second["committed_tokens"] == first["committed_tokens"] + len(second["ids"])


def test_client_reports_an_unreachable_server():
    with VerifierClient("http://127.0.0.1:9", retries=0) as client, \
            pytest.raises(VerifierError, match="cannot reach the verifier"):
        client.info()


@pytest.mark.parametrize(
    "cmd",
    [
        ["verifier_server.cli", "serve", "--auth", "none", "--model", "no-such-model"],
        ["verifier_server.cli", "generate", "--model", "no-such-model", "hi"],
        ["edge_agent.cli", "generate", "--drafter", "no-such-model", "hi"],
    ],
)
def test_unknown_model_is_a_cli_error_without_traceback(cmd):
    p = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "unknown model 'no-such-model'" in p.stderr and "Traceback" not in p.stderr


def test_agent_cli_streams_text_and_reports_json(server):
    cmd = [sys.executable, "-m", "edge_agent.cli", "generate", "--server", server.url,
           "--drafter", "smollm2-135m", "--max-tokens", "16", "--json", PROMPT]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    for key in ("text", "rounds", "committed_tokens", "draft_tokens", "accepted_draft_tokens",
                "tokens_per_round", "elapsed_s", "finish_reason"):
        assert key in out
    assert out["committed_tokens"] == 16 and out["finish_reason"] == "length"


def test_stop_string_ends_the_generation_and_is_not_returned(server):
    with VerifierClient(server.url) as client:
        full = Agent(client, None).generate(PROMPT, max_tokens=24)
        stop = full.text.decode()[8:12]  # a string the target is known to produce
        cut = full.text.decode().index(stop)
        result = Agent(client, None).generate(PROMPT, max_tokens=24, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text.decode() == full.text.decode()[:cut]
