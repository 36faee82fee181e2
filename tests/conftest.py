"""Fixtures over real parts: GGUF models from the registry, a real verifier process on loopback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from shared.models import resolve

ROOT = Path(__file__).resolve().parent.parent
LOSSLESS_REPORT: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VerifierProcess:
    """``sled-verifier serve`` in a subprocess, as a user would run it."""

    def __init__(self, model: str, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "verifier_server.cli", "serve", "--model", model,
               "--port", str(self.port), "--threads", "2", *extra]
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"verifier for {model} exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"verifier for {model} did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def verifier() -> Iterator:
    """Factory: one running verifier per (target, options), shared by the whole test session."""
    running: dict[tuple, VerifierProcess] = {}

    def get(model: str, *extra: str) -> VerifierProcess:
        key = (model, *extra)
        if key not in running:
            running[key] = VerifierProcess(model, *extra)
        return running[key]

    yield get
    for v in running.values():
        v.stop()


@pytest.fixture(scope="session")
def drafter():
    from edge_agent.drafter import Drafter

    loaded: dict[str, Drafter] = {}

    def get(name: str) -> Drafter:
        if name not in loaded:
            loaded[name] = Drafter(resolve(name), n_threads=2)
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def reference_backend():
    """In-process backends for the plain greedy reference, one per target."""
    from verifier_server.llama_backend import LlamaBackend

    loaded: dict[str, LlamaBackend] = {}

    def get(name: str) -> LlamaBackend:
        if name not in loaded:
            loaded[name] = LlamaBackend(resolve(name), name, n_slots=1, ctx_per_slot=2048, n_threads=2)
        return loaded[name]

    yield get
    for b in loaded.values():
        b.close()


def pytest_terminal_summary(terminalreporter) -> None:
    if LOSSLESS_REPORT:
        terminalreporter.section("lossless counts")
        for line in LOSSLESS_REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def tokenizer():
    """The real tokenizer of a registry model (vocabulary only: loads in a fraction of a second)."""
    import llama_cpp

    from shared.llama_text import LlamaText, quiet_llama_logs

    quiet_llama_logs()
    loaded: dict[str, LlamaText] = {}

    def get(name: str) -> LlamaText:
        if name not in loaded:
            params = llama_cpp.llama_model_default_params()
            params.vocab_only = True
            model = llama_cpp.llama_model_load_from_file(str(resolve(name)).encode(), params)
            loaded[name] = LlamaText(model)
        return loaded[name]

    return get
