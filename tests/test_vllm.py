"""The verifier on vLLM (``--engine vllm``), run for real: vLLM's CPU build in its own environment
(scripts/setup-vllm.sh), qwen2.5-coder-0.5b converted from the registry's GGUF, float32.

- argmax parity with the llama.cpp runner, teacher-forced over llama.cpp's greedy output;
- agents with a smollm2 drafter, four at once (their rounds share vLLM's batches), greedy and
  seeded SLEM, lossless against vLLM's own plain decoding of the same weights (near-tie rule;
  teacher-forced one token at a time where an output differs);
- the prefix cache read by later rounds, counted;
- a replica killed mid-generation: every device resumes on another, nothing lost;
- a rule the engine cannot serve (TLI: full rows) gets a 400 naming it.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_agent.agent import Agent
from edge_agent.client import VerifierClient
from edge_agent.drafter import Drafter
from shared.models import resolve
from shared.protocol import SamplingOptions
from verifier_server.llama.reference import plain_reference as llama_reference
from verifier_server.lossless import NEAR_TIE_GAP, TEACHER_FORCED_MARGIN, Reference, judge
from verifier_server.process import VerifierProcess
from verifier_server.vllm.convert import converted_dir

from conftest import LOSSLESS_REPORT, ROOT
from prompts import RAW

TARGET = "qwen2.5-coder-0.5b"
DRAFTER = "smollm2-135m"
MAX_TOKENS = 32
PYTHON = Path(os.environ.get("SLED_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
# vLLM's CPU build on a 2-core machine: its threads on both cores, a 1 GB KV cache, no compile step.
ENGINE = ("--engine", "vllm", "--dtype", "float32", "--kv-cache-gb", "1", "--gpu-memory-utilization", "0.5",
          "--enforce-eager", "--ctx-per-slot", "1024")
LONG = "".join(RAW[:6])  # over two 32-token blocks: later rounds read the prompt from the cache
pytestmark = pytest.mark.slow


def _available() -> None:
    hf = converted_dir(TARGET)
    missing = [] if PYTHON.exists() else [str(PYTHON)]
    missing += [] if (hf / "sled.json").exists() else [str(hf)]
    if missing:
        message = f"the vLLM environment is not set up (missing {', '.join(missing)}): run scripts/setup-vllm.sh {TARGET}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a missing environment is a failure, not a skip
        pytest.skip(message)


@pytest.fixture(scope="module")
def server() -> Iterator[VerifierProcess]:
    _available()
    with VerifierProcess(TARGET, *ENGINE, "--slots", "8", python=str(PYTHON), startup_timeout_s=300) as v:
        yield v


class VllmOracle:
    """vLLM's own plain decoding of the same weights, in a process of the vLLM environment."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([str(PYTHON), "-m", "verifier_server.vllm.reference", "--",
                                      "--model", TARGET, "--threads", "2", *ENGINE, "--slots", "4"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self._read("READY")

    def _read(self, marker: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(marker):
                return line[len(marker):].strip()
        raise RuntimeError(f"the vLLM reference exited with code {self.proc.wait()}")

    def ask(self, **job: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._read("RESULT"))

    def reference(self, prompt_ids: list[int], max_tokens: int, options: SamplingOptions) -> Reference:
        answer = self.ask(prompt_ids=prompt_ids, max_tokens=max_tokens, **_sampling(options))
        return Reference(ids=answer["ids"], gaps=answer["gaps"], finish_reason=answer["finish_reason"])

    def deficits(self, prompt_ids: list[int], ids: list[int], options: SamplingOptions) -> list[float]:
        return self.ask(prompt_ids=prompt_ids, forced_ids=ids, **_sampling(options))["deficits"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (vLLM's engine core and workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _sampling(options: SamplingOptions) -> dict[str, Any]:
    return {"temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p,
            "min_p": options.min_p, "seed": options.seed or 0}


@pytest.fixture(scope="module")
def oracle() -> Iterator[VllmOracle]:
    _available()
    o = VllmOracle()
    yield o
    o.close()


def test_info_names_the_engine_and_only_the_rules_it_serves(server):
    info = httpx.get(f"{server.url}/v1/info", timeout=10).json()
    assert info["backend"] == "vllm"
    assert {"greedy", "sample-slem"} <= set(info["capabilities"])
    assert "sample-tli" not in info["capabilities"]  # TLI needs full rows every round


def test_a_tli_round_gets_a_400_naming_the_rule(server, tokenizer):
    tok = tokenizer(TARGET)
    created = httpx.post(f"{server.url}/v1/sessions", timeout=60,
                         json={"prompt": "def f(x):", "max_tokens": 8, "temperature": 0.7, "seed": 3})
    assert created.status_code == 201, created.text
    sid = created.json()["session_id"]
    ids = tok.encode(b"\n    return")
    r = httpx.post(f"{server.url}/v1/sessions/{sid}/verify", timeout=60, json={
        "round": 1, "draft": base64.b64encode(b"".join(tok.piece(t) for t in ids)).decode(), "draft_ids": ids,
        "proposals": [{"ids": [t], "probs": [1.0]} for t in ids]})
    assert r.status_code == 400, r.text
    assert "sample-tli" in r.json()["error"]["message"]
    # The session is unharmed: a plain round still verifies.
    ok = httpx.post(f"{server.url}/v1/sessions/{sid}/verify", timeout=60, json={"round": 1, "draft": base64.b64encode(b"\n").decode()})
    assert ok.status_code == 200, ok.text


def test_argmax_parity_with_the_llama_cpp_runner(oracle, reference_backend):
    """vLLM's argmax, teacher-forced over llama.cpp's greedy output of the same GGUF: equal, or
    llama.cpp's own choice there was a near-tie (float32 dequantized weights against llama.cpp's
    quantized kernels: the last bits differ)."""
    backend = reference_backend(TARGET)
    agree = total = 0
    misses = []
    for prompt in RAW[:4]:
        prompt_ids = backend.tokenizer.prompt_ids(prompt, None)
        ref = llama_reference(backend, prompt_ids, MAX_TOKENS)
        deficits = oracle.deficits(prompt_ids, ref.ids, SamplingOptions())
        for i, d in enumerate(deficits):
            total += 1
            if d == 0.0:
                agree += 1
            else:
                misses.append((round(ref.gaps[i], 3), round(d, 3)))
    LOSSLESS_REPORT.append(f"vLLM vs llama.cpp argmax ({TARGET}, teacher-forced over llama.cpp's greedy output): "
                           f"{agree}/{total} positions agree; the rest at llama.cpp top-2 gaps / vLLM deficits {misses}")
    assert all(gap < NEAR_TIE_GAP and d < TEACHER_FORCED_MARGIN for gap, d in misses), misses
    assert agree >= 0.9 * total


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled-t0.7"])
def test_four_devices_at_once_are_lossless_against_vllms_plain_decoding(server, oracle, tokenizer, temperature):
    tok = tokenizer(TARGET)
    before = server.stats()
    cases = [LONG, *RAW[:3]]
    drafters = [Drafter(resolve(DRAFTER), n_threads=1) for _ in cases]

    def run(i: int):
        options = SamplingOptions(temperature=temperature, seed=100 + i)
        with VerifierClient(server.url) as client:
            agent = Agent(client, drafters[i], draft_tokens=6, follow_hint=False)
            return agent.generate(cases[i], max_tokens=MAX_TOKENS, sampling=options), options

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run, range(len(cases))))
    after = server.stats()
    counts = {"identical": 0, "near_tie": 0, "diverged": 0}
    failures, forced_total, forced_off = [], 0, 0.0
    for prompt, (result, options) in zip(cases, results):
        prompt_ids = tok.prompt_ids(prompt, None)
        verdict = judge(result.ids, oracle.reference(prompt_ids, MAX_TOKENS, options))
        counts[verdict.kind] += 1
        if verdict.kind != "identical":
            deficits = oracle.deficits(prompt_ids, result.ids, options)
            forced_total += len(deficits)
            forced_off = max(forced_off, *deficits)
            if max(deficits) >= TEACHER_FORCED_MARGIN:
                failures.append(f"{prompt[:20]!r}: committed tokens far from vLLM's one-by-one choice: {deficits}")
        if verdict.kind == "diverged":
            failures.append(f"{prompt[:20]!r}: diverged at {verdict.position} (gap {verdict.gap:.3f})")
    rounds = sum(r.rounds for r, _ in results)
    committed = sum(r.committed_tokens for r, _ in results)
    delta = {k: after[k] - before[k] for k in ("rounds", "positions", "cached_tokens", "rounds_read_cache",
                                                "cache_resends", "uncertified_rounds", "uncertified_rows")}
    LOSSLESS_REPORT.append(
        f"vLLM verifier, {len(cases)} devices at once ({DRAFTER}->{TARGET}, T={temperature}): {counts['identical']} "
        f"identical, {counts['near_tie']} near-tie, {counts['diverged']} diverged (vs vLLM's plain decoding); "
        f"teacher-forced over {forced_total} ids of the others, largest deficit {forced_off:.3f}; "
        f"{committed / max(rounds, 1):.2f} tokens/round; rounds {delta['rounds']}, computed positions "
        f"{delta['positions']}, cache-read positions {delta['cached_tokens']} in {delta['rounds_read_cache']} rounds, "
        f"resends {delta['cache_resends']}, uncertified SLEM rounds {delta['uncertified_rounds']} "
        f"({delta['uncertified_rows']} rows fetched whole)")
    assert not failures, failures
    assert all(r.committed_tokens == MAX_TOKENS or r.finish_reason != "length" for r, _ in results)
    # The long prompt's rounds read it from vLLM's prefix cache: later rounds compute their draft only.
    assert delta["rounds_read_cache"] > 0 and delta["cached_tokens"] >= 32 * delta["rounds_read_cache"]


def test_a_killed_replica_loses_nothing(server, oracle, tokenizer):
    """Two vLLM replicas; the one the devices start on is SIGKILLed at their first text: each
    resumes its session on the other from its ids, and its output is still vLLM's own."""
    tok = tokenizer(TARGET)
    doomed = VerifierProcess(TARGET, *ENGINE, "--slots", "4", python=str(PYTHON), startup_timeout_s=300)
    killed = threading.Event()

    def kill_once(chunk: bytes) -> None:
        if not killed.is_set():  # the machine dies: the server and vLLM's engine processes with it
            killed.set()
            for pid in [doomed.proc.pid, *_descendants(doomed.proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def run(i: int):
        drafter = Drafter(resolve(DRAFTER), n_threads=1) if i % 2 else None
        with VerifierClient([doomed.url, server.url], retries=1, backoff_s=0.05) as client:
            agent = Agent(client, drafter, draft_tokens=4, follow_hint=False, deadline_s=60)
            return agent.generate(RAW[i], max_tokens=MAX_TOKENS, on_text=kill_once if i == 0 else None)

    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(run, range(2)))
    finally:
        doomed.stop()
    assert killed.is_set() and sum(r.failovers for r in results) >= 1
    kinds = []
    for i, result in enumerate(results):
        ref = oracle.reference(tok.prompt_ids(RAW[i], None), MAX_TOKENS, SamplingOptions())
        kinds.append(judge(result.ids, ref).kind)
        assert result.committed_tokens == len(ref.ids)  # nothing lost, nothing repeated
    LOSSLESS_REPORT.append(f"vLLM failover (replica killed mid-generation, 2 agents, "
                           f"{sum(r.failovers for r in results)} failovers): {kinds}")
    assert "diverged" not in kinds, kinds
