"""What the benchmark measures on a target in its own process, before any verifier runs.

The target is loaded once per benchmark run, with the verifier's cores and thread count so that
its cost curve describes the verifier's forward passes: it yields the greedy references of the
lossless check, the measured cost curve t(B) and the parameter count for the GPU model. It is closed
before the verifier starts so the two never compete for cores or memory.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from shared.models import resolve
from verifier_server.backend import Backend, ForwardItem
from verifier_server.llama_backend import LlamaBackend
from verifier_server.reference import Reference

from bench.lossless import references
from bench.workload import Prompt

COST_CURVE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
COST_CURVE_REPEATS = 3
_FILLER = b"def add(a, b):\n    return a + b\n\n"


@dataclass
class TargetProfile:
    name: str
    n_params: int
    cost_curve: list[dict]  # [{"tokens": B, "seconds": best of COST_CURVE_REPEATS}]
    references: dict[str, Reference]


def cost_curve(backend: Backend) -> list[dict]:
    """Wall time of one forward pass of B tokens, logits at every position, as the verifier asks."""
    text = _FILLER * (max(COST_CURVE_TOKENS) // 4)
    tokens = backend.text.encode(text)
    assert len(tokens) >= max(COST_CURVE_TOKENS), "filler text too short for the cost curve"
    curve = []
    for b in COST_CURVE_TOKENS:
        best = float("inf")
        for _ in range(COST_CURVE_REPEATS):
            t0 = time.perf_counter()
            backend.forward([ForwardItem(0, 0, tokens[:b], b)])
            best = min(best, time.perf_counter() - t0)
        curve.append({"tokens": b, "seconds": round(best, 6)})
    return curve


def profile(target: str, prompts: list[Prompt], max_tokens: int, cores: tuple[int, ...]) -> TargetProfile:
    """Load ``target`` on ``cores`` (this process is pinned there meanwhile) and measure it."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        backend = LlamaBackend(resolve(target), target, n_slots=1, ctx_per_slot=4096, n_threads=len(cores))
        try:
            return TargetProfile(
                name=target,
                n_params=backend.n_params,
                cost_curve=cost_curve(backend),
                references=references(backend, prompts, max_tokens),
            )
        finally:
            backend.close()
    finally:
        os.sched_setaffinity(0, saved)
