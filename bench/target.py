"""What the benchmark measures on a target in its own process, before any verifier runs.

The target is loaded once per benchmark run, with the verifier's cores and thread count so that
its cost curve describes the verifier's forward passes: it yields the greedy references of the
lossless check, the measured cost curve t(B) and the parameter count for the GPU model. It is closed
before the verifier starts so the two never compete for cores or memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from bench.lossless import references
from bench.workload import Prompt
from shared.models import resolve
from shared.sampling import GREEDY_SAMPLING, Sampling
from verifier_server.llama.calibration import measure_cost_curve
from verifier_server.lossless import Reference

COST_CURVE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
COST_CURVE_REPEATS = 3


@dataclass
class TargetProfile:
    name: str
    n_params: int
    cost_curve: list[dict]  # [{"tokens": B, "seconds": best of COST_CURVE_REPEATS}]
    references: dict[str, Reference]
    # per prompt: its ids then the reference's, for a verifier that replays them (``--replay``)
    recordings: list[list[int]]


def profile(target: str, prompts: list[Prompt], max_tokens: int, cores: tuple[int, ...],
            sampling: Sampling = GREEDY_SAMPLING) -> TargetProfile:
    """Load ``target`` on ``cores`` (this process is pinned there meanwhile) and measure it."""
    from verifier_server.llama.backend import LlamaBackend  # the one import of llama.cpp here

    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        backend = LlamaBackend(resolve(target), target, n_slots=1, ctx_per_slot=4096, n_threads=len(cores))
        try:
            refs = references(backend, prompts, max_tokens, sampling)
            return TargetProfile(
                name=target,
                n_params=backend.n_params,
                cost_curve=[
                    {"tokens": b, "seconds": round(t, 6)}
                    for b, t in measure_cost_curve(backend, COST_CURVE_TOKENS, COST_CURVE_REPEATS).items()
                ],
                references=refs,
                recordings=[backend.tokenizer.prompt_ids(p.prompt, p.message_list) + refs[p.id].ids
                            for p in prompts],
            )
        finally:
            backend.close()
    finally:
        os.sched_setaffinity(0, saved)
