"""The verifier tier behind real nginx (the shipped ``deploy/nginx/sled.conf``), with real
processes: two replicas, four agents with their own device tokens, all talking to nginx only.

- A replica SIGKILLed mid-generation: every agent finishes, every output follows the lossless rule,
  committed ids are continuous (nothing lost or repeated); the test reports how many sessions moved.
- A rolling restart (SIGTERM, drain, start again, then the other replica) while the agents keep
  generating: nothing is lost either.
"""
from __future__ import annotations

import signal
import threading
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
from verifier_server.auth import hash_token, new_token
from verifier_server.llama.reference import plain_reference
from verifier_server.lossless import judge
from verifier_server.process import VerifierProcess, free_port

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

    def busiest(self) -> str:
        """The replica holding the most sessions now."""
        held = {n: httpx.get(f"{r.url}/v1/health", timeout=5).json()["sessions"] for n, r in self.replicas.items()}
        return max(held, key=lambda n: held[n])


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

    def kill_busiest(chunk: bytes) -> None:
        if not killed.is_set():  # the first text of agent 0: kill the replica holding most sessions
            killed.set()
            tier.replicas[tier.busiest()].proc.send_signal(signal.SIGKILL)

    def run(i: int) -> GenerationResult:
        agent = _agent(tier, i, drafters[i])
        with agent.client:
            return agent.generate(RAW[i], max_tokens=MAX_TOKENS, on_text=kill_busiest if i == 0 else None)

    with ThreadPoolExecutor(AGENTS) as pool:
        results = dict(enumerate(pool.map(run, range(AGENTS))))
    assert killed.is_set()
    assert sum(r.resumed for r in results.values()) >= 1  # the killed replica held sessions
    _check({i: [r] for i, r in results.items()}, reference_backend(TARGET), "nginx, replica SIGKILLed")


def test_a_rolling_restart_behind_nginx_loses_nothing(tier, drafters, reference_backend):
    """Each agent generates again and again while replica a, then replica b, is drained with
    SIGTERM (it must exit 0 within its grace period) and started again on its port."""
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
        exit_codes = {}
        for name in ("a", "b"):
            old = tier.replicas[name]
            old.proc.send_signal(signal.SIGTERM)
            exit_codes[name] = old.proc.wait(timeout=40)
            tier.start(name)
        restarted.set()
        results = {i: f.result(timeout=300) for i, f in enumerate(futures)}
    assert exit_codes == {"a": 0, "b": 0}
    assert sum(r.resumed for runs in results.values() for r in runs) >= 1  # sessions moved off a draining replica
    _check(results, reference_backend(TARGET), "nginx, rolling restart of both replicas")
