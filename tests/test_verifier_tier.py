"""The verifier as an operator runs it, with real processes: per-device tokens (hashes only),
session ownership, per-device limits, Prometheus metrics, the access log, readiness and the drain
on SIGTERM (``slow``: each starts a verifier on a model). Plus the pieces that need no model, in the
quick loop: the token bucket on a fake clock, the tokens file's errors, the token command and the
refusal to serve without credentials."""
from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.fleet import DeviceLimits
from verifier_server.auth import Credentials, CredentialsError, RoundLimiter, TokenBucket, hash_token, new_token
from verifier_server.process import LaunchError, VerifierProcess

ROOT = Path(__file__).resolve().parent.parent
TARGET = "smollm2-135m"  # the smallest model: these tests are about the service, not the model
DEVICES = ("pi-kitchen", "pi-office", "laptop")


# --- no model -----------------------------------------------------------------------------------
def test_token_bucket_allows_the_burst_then_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # empty: the next token in half a second
    now[0] += 0.5
    assert bucket.take() == 0.0
    now[0] += 10.0  # refills to the burst, not beyond
    assert [bucket.take() for _ in range(4)][-1] > 0


def test_round_limiter_is_per_device():
    limiter = RoundLimiter(DeviceLimits(rounds_per_s=1, burst=1), clock=lambda: 0.0)
    assert limiter.take("a") == 0.0 and limiter.take("b") == 0.0
    assert limiter.take("a") > 0


def test_credentials_identify_only_a_matching_bearer_token(tmp_path):
    tokens = {d: new_token() for d in DEVICES}
    path = tmp_path / "tokens"
    path.write_text("# device hashes\n" + "".join(f"{d} {hash_token(t)}\n" for d, t in tokens.items()))
    creds = Credentials.from_tokens_file(path)
    assert all(creds.identify(f"Bearer {t}") == d for d, t in tokens.items())
    assert creds.identify(None) is None and creds.identify("Bearer nope") is None
    assert creds.identify(f"Basic {tokens['laptop']}") is None
    assert tokens["laptop"] not in path.read_text()  # the file holds hashes only


@pytest.mark.parametrize("text, message", [
    ("pi sha256:1234\n", r"tokens:1: expected '<device-id> sha256:<64 hex digits>'"),
    (f"pi {hash_token('x')}\npi {hash_token('y')}\n", r"tokens:2: device 'pi' is listed twice"),
    ("# nothing\n", r"no device tokens"),
])
def test_a_bad_tokens_file_names_its_line(tmp_path, text, message):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(CredentialsError, match=message):
        Credentials.from_tokens_file(path)


def test_tokens_new_prints_a_token_once_and_its_hash():
    out = subprocess.run([sys.executable, "-m", "verifier_server.cli", "tokens", "new", "--device", "pi-kitchen"],
                         capture_output=True, text=True, check=True).stdout
    token = re.search(r"SLED_TOKEN=(\S+)", out).group(1)
    assert f"pi-kitchen {hash_token(token)}" in out and f"token_sha256: {hash_token(token)}" in out


def test_serving_without_credentials_needs_auth_none():
    p = subprocess.run([sys.executable, "-m", "verifier_server.cli", "serve", "--model", TARGET],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "--auth none" in p.stderr and "Traceback" not in p.stderr


# --- a real verifier with device tokens -----------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[tuple[VerifierProcess, dict[str, str]]]:
    """A verifier whose devices authenticate from a tokens file; low per-device limits so that
    they can be reached: 2 sessions, 4 rounds per second with bursts of 6."""
    work = tmp_path_factory.mktemp("tier")
    tokens = {d: new_token() for d in DEVICES}
    (work / "tokens").write_text("".join(f"{d} {hash_token(t)}\n" for d, t in tokens.items()))
    with VerifierProcess(TARGET, "--slots", "2", "--ctx-per-slot", "512", "--device-sessions", "2",
                         "--device-rounds-per-s", "4", "--device-burst", "6",
                         auth=("--tokens", str(work / "tokens")), log=work / "verifier.log",
                         startup_timeout_s=120) as server:
        yield server, tokens


def _as(tokens: dict[str, str], device: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tokens[device]}"}


def _create(url: str, headers: dict[str, str], **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/sessions", json={"prompt": "def add(a, b):", "max_tokens": 8, **extra},
                      headers=headers, timeout=60)


@pytest.mark.slow
def test_requests_without_a_valid_token_get_401(fleet):
    server, _ = fleet
    for headers in ({}, {"authorization": "Bearer sled_wrong"}, {"authorization": "token abc"}):
        r = _create(server.url, headers)
        assert r.status_code == 401 and "device token" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    for guarded in ("/v1/info", "/v1/stats"):  # the counters too: a device's or an operator's token
        assert httpx.get(f"{server.url}{guarded}", timeout=10).status_code == 401
    for open_path in ("/healthz", "/readyz", "/metrics", "/v1/health"):  # probes and the scraper
        assert httpx.get(f"{server.url}{open_path}", timeout=10).status_code == 200


@pytest.mark.slow
def test_a_session_belongs_to_the_device_that_created_it(fleet):
    server, tokens = fleet
    mine, other = _as(tokens, "pi-kitchen"), _as(tokens, "pi-office")
    sid = _create(server.url, mine).json()["session_id"]
    verify = f"{server.url}/v1/sessions/{sid}/verify"
    stranger = httpx.post(verify, json={"round": 1}, headers=other, timeout=60)
    unknown = httpx.post(f"{server.url}/v1/sessions/{'0' * 32}/verify", json={"round": 1}, headers=other, timeout=60)
    assert stranger.status_code == unknown.status_code == 404
    assert stranger.json()["error"]["message"].replace(sid, "X") == unknown.json()["error"]["message"].replace("0" * 32, "X")
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=other, timeout=10).status_code == 404
    assert httpx.post(verify, json={"round": 1}, headers=mine, timeout=60).status_code == 200  # untouched
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=mine, timeout=10).status_code == 204


@pytest.mark.slow
def test_idempotency_keys_are_per_device(fleet):
    server, tokens = fleet
    a = _create(server.url, _as(tokens, "pi-kitchen"), idempotency_key="same-key").json()["session_id"]
    again = _create(server.url, _as(tokens, "pi-kitchen"), idempotency_key="same-key").json()["session_id"]
    b = _create(server.url, _as(tokens, "pi-office"), idempotency_key="same-key").json()["session_id"]
    assert a == again and b != a  # another device's key never reaches this device's session
    for device, sid in (("pi-kitchen", a), ("pi-office", b)):
        httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=_as(tokens, device), timeout=10)


@pytest.mark.slow
def test_per_device_session_limit_gives_429_with_retry_after(fleet):
    server, tokens = fleet
    headers = _as(tokens, "laptop")
    sids = [_create(server.url, headers).json()["session_id"] for _ in range(2)]
    third = _create(server.url, headers)
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    assert "maximum of 2 sessions" in third.json()["error"]["message"]
    other = _create(server.url, _as(tokens, "pi-kitchen"))
    assert other.status_code == 201  # other devices are not affected
    httpx.delete(f"{server.url}/v1/sessions/{other.json()['session_id']}", headers=_as(tokens, "pi-kitchen"),
                 timeout=10)
    for sid in sids:
        httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=headers, timeout=10)


@pytest.mark.slow
def test_per_device_round_rate_gives_429_with_retry_after(fleet):
    server, tokens = fleet
    headers = _as(tokens, "pi-office")
    sid = _create(server.url, headers).json()["session_id"]
    # Earlier tests' rounds of this device (refused ones count too) drew on its bucket: let it refill
    # to the burst (6 rounds at 4 a second) so that the burst below is whole.
    time.sleep(6 / 4 + 0.5)
    answers = [httpx.post(f"{server.url}/v1/sessions/{sid}/verify", json={"round": 1}, headers=headers, timeout=60)
               for _ in range(8)]  # retries of one round: cheap, but each counts against the rate
    limited = [r for r in answers if r.status_code == 429]
    assert limited and all(int(r.headers["retry-after"]) >= 1 for r in limited)
    assert sum(r.status_code == 200 for r in answers) >= 6  # the burst went through
    httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=headers, timeout=10)


@pytest.mark.slow
def test_metrics_count_drafts_per_position_and_device(fleet):
    server, tokens = fleet
    headers = {**_as(tokens, "pi-kitchen"), "content-type": "application/json"}
    created = _create(server.url, headers).json()
    info = httpx.get(f"{server.url}/v1/info", headers=headers, timeout=10).json()
    assert info["model"] == TARGET
    # The target's own continuation as the draft: accepted in full.
    plain = httpx.post(f"{server.url}/v1/sessions/{created['session_id']}/verify", json={"round": 1},
                       headers=headers, timeout=60).json()
    text = plain["text"]
    sid = _create(server.url, headers).json()["session_id"]
    httpx.post(f"{server.url}/v1/sessions/{sid}/verify", json={"round": 1, "draft": text}, headers=headers, timeout=60)
    lost_bet = base64.b64encode(b"\x00 not the answer to round 1").decode()
    stale = httpx.post(f"{server.url}/v1/sessions/{sid}/verify", json={"round": 2, "draft": lost_bet, "chained": 1},
                       headers=headers, timeout=60).json()
    assert stale["stale"] and stale["text"] == "" and stale["round"] == 2
    body = httpx.get(f"{server.url}/metrics", timeout=10).text

    def value(name: str) -> float:
        return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)} ([0-9.e+-]+)$", body, re.M))

    assert value("sled:spec_decode_num_drafts_total") >= 1
    assert value("sled:spec_decode_num_accepted_tokens_total") >= 1
    assert value('sled:spec_decode_num_accepted_tokens_per_pos_total{position="0"}') >= 1
    assert value('sled:device_committed_tokens_total{device="pi-kitchen"}') >= 2
    assert value("sled:forward_pass_seconds_count") >= 3 and value("sled:sessions_active") >= 2
    assert 'sled:rounds_total{outcome="no_draft"}' in body and 'sled:rounds_total{outcome="accepted_all"}' in body
    assert value('sled:rounds_total{outcome="stale"}') == 1
    assert 'sled:http_requests_total{route="/v1/sessions/{session_id}/verify",status="200"}' in body
    for s in (created["session_id"], sid):
        httpx.delete(f"{server.url}/v1/sessions/{s}", headers=headers, timeout=10)


@pytest.mark.slow
def test_access_log_has_one_json_line_per_request(fleet):
    server, tokens = fleet
    headers = _as(tokens, "pi-kitchen")
    sid = _create(server.url, headers).json()["session_id"]
    httpx.post(f"{server.url}/v1/sessions/{sid}/verify", json={"round": 1}, headers=headers, timeout=60)
    # The verify line is written as its answer goes out, before the replica reads the next request:
    # the DELETE's answer comes after it.
    httpx.delete(f"{server.url}/v1/sessions/{sid}", headers=headers, timeout=10)
    lines = [json.loads(x) for x in server.log.read_text().splitlines() if x.startswith("{")]
    verify = [x for x in lines if x["session"] == sid and x["method"] == "POST"]
    assert verify and verify[0] == {**verify[0], "device": "pi-kitchen", "round": 1, "status": 200}
    assert verify[0]["ms"] > 0


# --- drain ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_drains_then_exits(tmp_path):
    """Readiness turns false, new sessions get 503 with Retry-After, idle sessions are released
    (404: the device resumes elsewhere), the replica keeps answering for the linger even though it
    is idle, and the process exits cleanly within the grace period."""
    server = VerifierProcess(TARGET, "--slots", "2", "--ctx-per-slot", "512", "--drain-grace", "20",
                             "--drain-linger", "2", log=tmp_path / "v.log", startup_timeout_s=120)
    try:
        sid = _create(server.url, {}).json()["session_id"]
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
        with httpx.Client(base_url=server.url, timeout=10) as keep_alive:  # a connection the drain must serve
            assert keep_alive.get("/healthz").status_code == 200
            t0 = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            ready = new = stale = None
            while time.monotonic() - t0 < 5 and None in (ready, new, stale):
                try:
                    if keep_alive.get("/readyz").status_code == 503:
                        ready = 503
                        new = keep_alive.post("/v1/sessions", json={"prompt": "x", "max_tokens": 2})
                        stale = keep_alive.post(f"/v1/sessions/{sid}/verify", json={"round": 1})
                except httpx.TransportError:
                    break  # drained already: the process is gone
                time.sleep(0.02)
        assert ready == 503, "readyz never turned 503 while draining"
        assert new is not None and new.status_code == 503 and new.json()["error"]["code"] == "draining"
        assert int(new.headers["retry-after"]) >= 1
        assert stale is not None and stale.status_code == 404  # released: its device resumes elsewhere
        assert server.proc.wait(timeout=25) == 0
        assert time.monotonic() - t0 >= 2.0, "an idle replica closed its port before the linger"
        assert "draining" in (tmp_path / "v.log").read_text()
    finally:
        server.stop()


@pytest.mark.slow
def test_a_replica_id_prefixes_session_ids(tmp_path):
    with VerifierProcess(TARGET, "--replica-id", "east-1", "--slots", "1", "--ctx-per-slot", "256",
                         startup_timeout_s=120) as server:
        sid = _create(server.url, {}).json()["session_id"]
        assert re.fullmatch(r"east-1\.[0-9a-f]{32}", sid)
    with pytest.raises(LaunchError, match="--replica-id"):
        VerifierProcess(TARGET, "--replica-id", "a.b", log=tmp_path / "bad.log", startup_timeout_s=60)


@pytest.mark.slow
def test_one_fleet_file_serves_the_verifier_and_the_device(tmp_path, monkeypatch):
    """The verifier admits devices by the hashes in the fleet file; the device daemon reads its own
    token from the variable its entry names, in the same file, and its local apps get answers."""
    from verifier_server.process import AgentDaemonProcess, free_port

    token = new_token()
    port = free_port()
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(f"""version: 1
verifier:
  urls: [http://127.0.0.1:{port}]
  device_limits: {{sessions: 4, rounds_per_s: 50, burst: 100}}
groups:
  pi: {{drafter: smollm2-135m, threads: 1}}
devices:
  pi-kitchen: {{group: pi, token_env: SLED_TEST_TOKEN, token_sha256: "{hash_token(token)}"}}
  pi-office: {{group: pi, token_env: SLED_TEST_TOKEN}}
""")
    monkeypatch.setenv("SLED_TEST_TOKEN", token)  # the daemon, a child process, inherits it
    with VerifierProcess(TARGET, "--slots", "1", "--ctx-per-slot", "512", auth=("--fleet", str(fleet_file)),
                         port=port, startup_timeout_s=120), \
            AgentDaemonProcess("--config", str(fleet_file), "--device", "pi-kitchen", startup_timeout_s=120) as daemon:
        answer = httpx.post(f"{daemon.url}/v1/completions", timeout=120,
                            json={"model": TARGET, "prompt": "def add(a, b):", "max_tokens": 6}).json()
        assert answer["usage"]["completion_tokens"] == 6 and answer["system_fingerprint"] != "sled-local-fallback"
    monkeypatch.setenv("SLED_TEST_TOKEN", "sled_not_the_token")
    with VerifierProcess(TARGET, "--slots", "1", "--ctx-per-slot", "512", auth=("--fleet", str(fleet_file)),
                         port=port, startup_timeout_s=120), \
            AgentDaemonProcess("--config", str(fleet_file), "--device", "pi-kitchen", startup_timeout_s=120) as daemon:
        refused = httpx.post(f"{daemon.url}/v1/completions", timeout=120,
                             json={"model": TARGET, "prompt": "def add(a, b):", "max_tokens": 6})
        assert refused.status_code >= 400 and "device token" in refused.text
