"""Fixtures over real parts: GGUF models from the registry, a real verifier process on loopback."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.models import resolve
from verifier_server.process import VerifierProcess

ROOT = Path(__file__).resolve().parent.parent
LOSSLESS_REPORT: list[str] = []


@pytest.fixture(scope="session")
def verifier() -> Iterator:
    """Factory: one running verifier per (target, options), shared by the whole test session."""
    running: dict[tuple, VerifierProcess] = {}

    def get(model: str, *extra: str) -> VerifierProcess:
        key = (model, *extra)
        if key not in running:
            running[key] = VerifierProcess(model, *extra, threads=2, startup_timeout_s=120)
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
    from verifier_server.llama.backend import LlamaBackend

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

    from shared.llama_tokenizer import LlamaTokenizer, quiet_llama_logs

    quiet_llama_logs()
    loaded: dict[str, LlamaTokenizer] = {}

    def get(name: str) -> LlamaTokenizer:
        if name not in loaded:
            params = llama_cpp.llama_model_default_params()
            params.vocab_only = True
            model = llama_cpp.llama_model_load_from_file(str(resolve(name)).encode(), params)
            loaded[name] = LlamaTokenizer(model)
        return loaded[name]

    return get
