"""Failover across verifier replicas with real processes: one replica is killed with SIGKILL in the
middle of four concurrent generations; every generation completes on the other replica, its output
follows the lossless rule, and its committed ids are continuous (none lost, none repeated)."""
from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from edge_agent.agent import Agent
from edge_agent.client import VerifierClient, VerifierError
from edge_agent.drafter import Drafter
from shared.models import resolve
from verifier_server.llama.reference import plain_reference
from verifier_server.lossless import judge
from verifier_server.process import VerifierProcess

from conftest import LOSSLESS_REPORT
from prompts import RAW

TARGET = "qwen2.5-coder-0.5b"
MAX_TOKENS = 40
pytestmark = pytest.mark.slow


def test_a_killed_replica_loses_nothing(reference_backend):
    backend = reference_backend(TARGET)
    replicas = [VerifierProcess(TARGET, "--slots", "4", "--ctx-per-slot", "512", threads=1) for _ in range(2)]
    doomed = replicas[0]
    killed = threading.Event()
    drafters = [Drafter(resolve("smollm2-135m"), n_threads=1) if i % 2 else None for i in range(4)]

    def kill_once(chunk: bytes) -> None:
        if not killed.is_set():  # the first text on replica 0: kill it mid-generation
            killed.set()
            doomed.proc.send_signal(signal.SIGKILL)

    def run(i: int):
        client = VerifierClient([r.url for r in replicas], retries=1, backoff_s=0.05, start=i % 2)
        with client:
            agent = Agent(client, drafters[i], draft_tokens=4, follow_hint=False, deadline_s=20)
            return agent.generate(RAW[i], max_tokens=MAX_TOKENS, on_text=kill_once if i == 0 else None)

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(run, range(4)))
    finally:
        for r in replicas:
            r.stop()
    assert killed.is_set() and sum(r.failovers for r in results) >= 1
    kinds = []
    for i, result in enumerate(results):
        ref = plain_reference(backend, backend.tokenizer.prompt_ids(RAW[i], None), MAX_TOKENS)
        kinds.append(judge(result.ids, ref).kind)
        assert result.committed_tokens == len(ref.ids)  # nothing lost, nothing repeated
        assert result.text == b"".join(backend.tokenizer.piece(t) for t in result.ids)
    LOSSLESS_REPORT.append(f"failover (replica killed mid-generation, 4 agents, "
                           f"{sum(r.failovers for r in results)} failovers): {kinds}")
    assert "diverged" not in kinds, kinds


def test_no_reachable_verifier_fails_after_the_deadline():
    with VerifierClient(["http://127.0.0.1:9", "http://127.0.0.1:10"], retries=0, backoff_s=0.01) as client:
        agent = Agent(client, None, deadline_s=0.5)
        with pytest.raises(VerifierError, match="no verifier answered") as err:
            agent.generate("x", max_tokens=2)
    assert err.value.status == 503
