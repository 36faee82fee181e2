"""The verifier tier behind real nginx (the shipped ``deploy/nginx/sled.conf``), with real
processes: two replicas, four agents with their own device tokens, all talking to nginx only.

- A replica SIGKILLed mid-generation: every agent finishes, every output follows the lossless rule,
  committed ids are continuous (nothing lost or repeated); the test reports how many sessions moved.
- A rolling restart (SIGTERM, drain, start again, then the other replica) while the agents keep
  generating: nothing is lost either.
- A third replica added by the recipe in the file's header: every session's rounds reach the
  replica that holds it.
- The file's TLS lines: a device's client verifies the certificate and works over https.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from edge_agent.agent import Agent, GenerationResult
from edge_agent.client import VerifierClient
from edge_agent.drafter import Drafter
from shared.models import resolve
from shared.protocol import SessionCreate, SessionCreated
from verifier_server.auth import hash_token, new_token
from verifier_server.llama.reference import plain_reference
from verifier_server.lossless import judge
from verifier_server.process import VerifierProcess, free_port

import lb
from conftest import LOSSLESS_REPORT
from lb import Nginx, nginx_binary
from prompts import RAW

TARGET = "qwen2.5-coder-0.5b"
MAX_TOKENS = 40
AGENTS = 4
pytestmark = pytest.mark.slow


@dataclass
class Tier:
    work: Path
    tokens_file: Path
    tokens: dict[str, str]  # device -> token
    ports: dict[str, int]  # replica name -> port
    replicas: dict[str, VerifierProcess]
    nginx: Nginx

    def start(self, name: str) -> VerifierProcess:
        self.replicas[name] = VerifierProcess(
            TARGET, "--replica-id", name, "--slots", "4", "--ctx-per-slot", "512", "--drain-grace", "20",
            threads=1, auth=("--tokens", str(self.tokens_file)), port=self.ports[name],
            log=self.work / f"verifier-{name}.log", startup_timeout_s=180)
        return self.replicas[name]


@pytest.fixture
def tier(tmp_path) -> Iterator[Tier]:
    nginx_binary()  # skips, with the reason, where nginx cannot be had
    tokens = {f"device-{i}": new_token() for i in range(AGENTS)}
    (tmp_path / "tokens").write_text("".join(f"{d} {hash_token(t)}\n" for d, t in tokens.items()))
    ports = {"a": free_port(), "b": free_port()}
    t = Tier(tmp_path, tmp_path / "tokens", tokens, ports, {}, None)  # type: ignore[arg-type]
    try:
        for name in ports:
            t.start(name)
        t.nginx = Nginx(tmp_path / "nginx", free_port(), ports)
        yield t
    finally:
        if t.nginx is not None:
            t.nginx.stop()
        for r in t.replicas.values():
            r.stop()


@pytest.fixture(scope="module")
def drafters() -> list[Drafter | None]:
    """Half the agents draft with SmolLM2 (another tokenizer), half decode plainly."""
    return [Drafter(resolve("smollm2-135m"), n_threads=1) if i % 2 else None for i in range(AGENTS)]


def _agent(tier: Tier, i: int, drafter: Drafter | None) -> Agent:
    client = VerifierClient(tier.nginx.url, retries=2, backoff_s=0.1, token=tier.tokens[f"device-{i}"])
    return Agent(client, drafter, draft_tokens=4, follow_hint=False, deadline_s=60)


def _check(results: dict[int, list[GenerationResult]], backend, what: str) -> None:
    """Every generation complete, continuous and lossless; the counts go to the report."""
    kinds = []
    for i, runs in results.items():
        ref = plain_reference(backend, backend.tokenizer.prompt_ids(RAW[i], None), MAX_TOKENS)
        for result in runs:
            assert result.committed_tokens == len(ref.ids), (i, result.summary())  # nothing lost or repeated
            assert result.text == b"".join(backend.tokenizer.piece(t) for t in result.ids)
            kinds.append(judge(result.ids, ref).kind)
    moved = sum(r.resumed for runs in results.values() for r in runs)
    LOSSLESS_REPORT.append(f"{what}: {len(kinds)} generations, {moved} sessions moved: "
                           f"{kinds.count('identical')} identical, {kinds.count('near_tie')} near-tie")
    assert "diverged" not in kinds, kinds


def test_a_replica_killed_behind_nginx_loses_nothing(tier, drafters, reference_backend):
    killed = threading.Event()
    opened: list[str] = []  # agent 0's session ids: each starts with its replica's id

    def kill_its_replica(chunk: bytes) -> None:
        if not killed.is_set():  # agent 0's first text: kill the replica holding its session, mid-generation
            killed.set()
            tier.replicas[opened[-1].split(".", 1)[0]].proc.send_signal(signal.SIGKILL)

    def run(i: int) -> GenerationResult:
        agent = _agent(tier, i, drafters[i])
        if i == 0:
            create = agent.client.create_session

            def recorded(req: SessionCreate) -> SessionCreated:
                created = create(req)
                opened.append(created.session_id)
                return created

            agent.client.create_session = recorded  # type: ignore[method-assign]
        with agent.client:
            return agent.generate(RAW[i], max_tokens=MAX_TOKENS, on_text=kill_its_replica if i == 0 else None)

    with ThreadPoolExecutor(AGENTS) as pool:
        results = dict(enumerate(pool.map(run, range(AGENTS))))
    assert killed.is_set()
    assert sum(r.resumed for r in results.values()) >= 1  # the killed replica held sessions
    _check({i: [r] for i, r in results.items()}, reference_backend(TARGET), "nginx, replica SIGKILLed")


def test_a_rolling_restart_behind_nginx_loses_nothing(tier, drafters, reference_backend):
    """Each agent generates again and again while replica a, then replica b, is drained with
    SIGTERM (it must exit 0 within its grace period) and started again on its port. The long run
    (SLED_RESTART_SOAK_S=600 SLED_RESTART_EVERY_S=120) goes on restarting one replica, a and b in
    turn, every period until the time is up."""
    soak_s = float(os.environ.get("SLED_RESTART_SOAK_S", "0"))
    every_s = float(os.environ.get("SLED_RESTART_EVERY_S", "120"))
    restarted = threading.Event()
    first_text = threading.Event()

    def run(i: int) -> list[GenerationResult]:
        agent, runs = _agent(tier, i, drafters[i]), []
        on_text: Callable[[bytes], None] = lambda _: first_text.set()  # noqa: E731
        with agent.client:
            while not restarted.is_set() or not runs:
                runs.append(agent.generate(RAW[i], max_tokens=MAX_TOKENS, on_text=on_text))
        return runs

    with ThreadPoolExecutor(AGENTS) as pool:
        futures = [pool.submit(run, i) for i in range(AGENTS)]
        assert first_text.wait(120)
        began = time.monotonic()
        exit_codes = []
        for turn in itertools.count():
            if turn >= 2 and time.monotonic() - began + every_s > soak_s:
                break
            if turn >= 2:
                time.sleep(every_s)  # the agents generate on meanwhile: the soak's load
            name = "ab"[turn % 2]
            old = tier.replicas[name]
            old.proc.send_signal(signal.SIGTERM)
            exit_codes.append(old.proc.wait(timeout=40))
            tier.start(name)
        restarted.set()
        results = {i: f.result(timeout=300) for i, f in enumerate(futures)}
    assert exit_codes == [0] * len(exit_codes)
    assert sum(r.resumed for runs in results.values() for r in runs) >= 1  # sessions moved off a draining replica
    _check(results, reference_backend(TARGET), f"nginx, {len(exit_codes)} rolling restarts "
           f"over {time.monotonic() - began:.0f} s")


def with_replica(conf: str, name: str) -> str:
    """``conf`` with replica ``name`` (at verifier-NAME:8000) added by the four steps that
    deploy/nginx/sled.conf's header gives, applied literally."""
    server = f"server verifier-{name}:8000"
    others = re.findall(r"^upstream sled_(?!new\b)(\w+) \{", conf, re.M)
    steps = [  # (what, pattern, replacement, how many places)
        ("1. its line in the map", r"(?m)^(    default  sled_new;)", f"    {name}        sled_{name};\n\\1", 1),
        ("4. a backup in every other replica's upstream", r"(?m)^(    keepalive 32;\n\})", f"    {server} backup;\n\\1",
         len(others)),
        ("2. its server for new sessions", r"(upstream sled_new \{\n    least_conn;\n)",
         f"\\1    {server} max_fails=1 fail_timeout=10s;\n", 1),
        ("3. its own upstream", r"(?m)^(server \{)", f"upstream sled_{name} {{\n    {server} max_fails=1 fail_timeout=10s;\n"
         + "".join(f"    server verifier-{o}:8000 backup;\n" for o in others) + "    keepalive 32;\n}\n\n\\1", 1),
    ]
    for what, pattern, replacement, places in steps:
        conf, n = re.subn(pattern, replacement, conf)
        assert n == places, f"step {what}: {n} places in sled.conf instead of {places}"
    return conf


def test_a_third_replica_added_by_the_recipe_gets_its_sessions_rounds(tmp_path, monkeypatch):
    """Replicas a, b and c (c added to the shipped file by its header's recipe) behind nginx: new
    sessions are spread over all three, every session's rounds and its deletion reach the replica
    that holds it (any other answers 404), and a name nginx does not know still gets an answer."""
    nginx_binary()
    conf = tmp_path / "sled-abc.conf"
    conf.write_text(with_replica(lb.SHIPPED.read_text(), "c"))
    monkeypatch.setattr(lb, "SHIPPED", conf)  # Nginx runs the file as shipped, c added
    ports = {name: free_port() for name in "abc"}

    def start(name: str) -> VerifierProcess:
        return VerifierProcess("smollm2-135m", "--replica-id", name, "--slots", "4", "--ctx-per-slot", "256",
                               threads=1, port=ports[name], log=tmp_path / f"verifier-{name}.log",
                               startup_timeout_s=180)

    with ThreadPoolExecutor(3) as pool:
        replicas = dict(zip(ports, pool.map(start, ports)))
    try:
        with Nginx(tmp_path / "nginx", free_port(), ports) as nginx, httpx.Client(base_url=nginx.url, timeout=60) as http:
            created = [http.post("/v1/sessions", json={"prompt": "def add(a, b):", "max_tokens": 4}) for _ in range(6)]
            assert all(r.status_code == 201 for r in created), [r.text for r in created]
            sessions = [r.json()["session_id"] for r in created]
            assert {sid.split(".")[0] for sid in sessions} == {"a", "b", "c"}  # placement reaches c too
            for sid in sessions:
                held = {n: httpx.get(f"{r.url}/v1/health", timeout=5).json()["sessions"] for n, r in replicas.items()}
                answer = http.post(f"/v1/sessions/{sid}/verify", json={"round": 1})
                assert answer.status_code == 200 and answer.json()["ids"], (sid, answer.text)
                assert http.delete(f"/v1/sessions/{sid}").status_code == 204
                after = {n: httpx.get(f"{r.url}/v1/health", timeout=5).json()["sessions"] for n, r in replicas.items()}
                owner = sid.split(".")[0]
                assert after == {**held, owner: held[owner] - 1}, (sid, held, after)  # deleted where it lived
            unknown = http.post(f"/v1/sessions/z.{'0' * 32}/verify", json={"round": 1})
            assert unknown.status_code == 404  # any replica answers; the device would resume there
    finally:
        for r in replicas.values():
            r.stop()


def with_tls(conf: str, port: int, cert: Path, key: Path) -> str:
    """``conf`` with the TLS lines its closing comment gives, in its server block (listening on
    ``port``, with ``cert`` and ``key``) beside the plain listener the test harness uses. An nginx
    older than 1.25.1 takes the comment's ``listen ... ssl http2`` instead of ``http2 on``."""
    comment = conf[conf.index("# TLS termination:"):]
    lines = [line[1:].split("#")[0].strip() for line in comment.splitlines() if line.startswith("#     ")]
    version = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr
    old = tuple(int(x) for x in re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version).groups()) < (1, 25, 1)
    tls = {"listen 443 ssl;": f"listen 127.0.0.1:{port} ssl{' http2' if old else ''};",
           "http2 on;": "" if old else "http2 on;",
           "ssl_certificate     /etc/ssl/sled/fullchain.pem;": f"ssl_certificate {cert};",
           "ssl_certificate_key /etc/ssl/sled/privkey.pem;": f"ssl_certificate_key {key};"}
    block = "".join(f"    {tls.get(line, line)}\n" for line in lines)
    assert "ssl_certificate " in block and "ssl_certificate_key " in block, lines
    return conf.replace("    listen 8080;\n", "    listen 8080;\n" + block, 1)


def test_a_device_reaches_the_tier_over_the_documented_tls(tmp_path, monkeypatch):
    """The TLS lines of deploy/nginx/sled.conf in front of a replica: the agent's client, with its
    token, trusts the tier's certificate through SSL_CERT_FILE (as deploy/README.md says) and
    verifies rounds over https; a client without that CA refuses the connection."""
    nginx_binary()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate to test TLS with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=sled test",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    token = new_token()
    (tmp_path / "tokens").write_text(f"pi-kitchen {hash_token(token)}\n")
    tls_port = free_port()
    conf = tmp_path / "sled-tls.conf"
    conf.write_text(with_tls(lb.SHIPPED.read_text(), tls_port, cert, key))
    monkeypatch.setattr(lb, "SHIPPED", conf)  # Nginx runs the shipped file, its TLS lines in
    ports = {"a": free_port(), "b": free_port()}  # b is down: nginx passes its share on to a
    with VerifierProcess("smollm2-135m", "--replica-id", "a", "--slots", "2", "--ctx-per-slot", "256", threads=1,
                         auth=("--tokens", str(tmp_path / "tokens")), port=ports["a"], startup_timeout_s=180), \
            Nginx(tmp_path / "nginx", free_port(), ports):
        url = f"https://127.0.0.1:{tls_port}"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/healthz", timeout=10)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        with VerifierClient(url, token=token) as client:
            sid = client.create_session(SessionCreate(prompt="def add(a, b):", max_tokens=4)).session_id
            assert sid.startswith("a.") and client.verify(sid, 1, b"").ids
            client.delete_session(sid)
