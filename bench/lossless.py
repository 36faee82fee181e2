"""The lossless check: every committed output against plain greedy decoding of the same target.

Speculation must reproduce the one-token-at-a-time greedy output exactly. Batched forward passes
of different shapes round differently, so where the reference's best two logits were nearly tied
a different token can win without any bug; such a divergence is a near tie, any other one a failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from verifier_server.backend import Backend
from verifier_server.reference import Reference, greedy_reference

from bench.workload import Prompt

NEAR_TIE_GAP = 0.5  # logits; a float32 batch-shape difference moves logits by far less than this


def references(backend: Backend, prompts: list[Prompt], max_tokens: int) -> dict[str, Reference]:
    """The greedy reference of each prompt, keyed by prompt id."""
    out = {}
    for p in prompts:
        ids = backend.text.prompt_ids(p.prompt, p.message_list)
        out[p.id] = greedy_reference(backend, ids, max_tokens)
    return out


@dataclass
class Tally:
    """Lossless counts of one run; ``failures`` describes every divergence that was not a near tie."""

    identical: int = 0
    near_tie: int = 0
    total: int = 0
    failures: list[dict] = field(default_factory=list)

    def add(self, prompt_id: str, ids: list[int], ref: Reference) -> None:
        self.total += 1
        if ids == ref.ids:
            self.identical += 1
            return
        # No differing position means one output is a truncation of the other: never a near tie.
        pos = next((i for i, (a, b) in enumerate(zip(ids, ref.ids)) if a != b), None)
        if pos is not None and ref.gaps[pos] < NEAR_TIE_GAP:
            self.near_tie += 1
            return
        self.failures.append({
            "prompt": prompt_id,
            "position": min(len(ids), len(ref.ids)) if pos is None else pos,
            "reference_gap": None if pos is None else round(ref.gaps[pos], 4),
            "committed_tokens": len(ids),
            "reference_tokens": len(ref.ids),
        })
