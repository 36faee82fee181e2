"""The lossless check: every committed output against plain greedy decoding of the same target.

Speculation must reproduce the one-token-at-a-time greedy output exactly. Batched forward passes
of different shapes round differently, so where the reference's best two logits were nearly tied
a different token can win without any bug; such a divergence is a near tie, any other one a failure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bench.procs import BenchError
from bench.workload import Prompt, prompt_seed
from shared.sampling import GREEDY_SAMPLING, Sampling
from verifier_server.llama.forward import ForwardBackend
from verifier_server.llama.reference import plain_reference
from verifier_server.lossless import Reference, judge


def references(backend: ForwardBackend, prompts: list[Prompt], max_tokens: int,
               sampling: Sampling = GREEDY_SAMPLING) -> dict[str, Reference]:
    """The plain reference of each prompt (greedy, or seeded sampling with the prompt's seed)."""
    if backend.tokenizer.chat_template is None and any(p.kind == "chat" for p in prompts):
        raise BenchError(f"{backend.model_name} has no chat template: choose raw prompts with --kind code")
    out = {}
    for p in prompts:
        ids = backend.tokenizer.prompt_ids(p.prompt, p.message_list)
        out[p.id] = plain_reference(backend, ids, max_tokens, sampling, prompt_seed(p.id))
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
        verdict = judge(ids, ref)
        if verdict.kind == "identical":
            self.identical += 1
        elif verdict.kind == "near_tie":
            self.near_tie += 1
        else:
            self.failures.append({
                "prompt": prompt_id,
                "position": verdict.position,
                "reference_gap": round(verdict.gap, 4),
                "committed_tokens": len(ids),
                "reference_tokens": len(ref.ids),
            })
