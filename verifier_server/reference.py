"""Plain autoregressive greedy decoding on a backend: the baseline that speculation must reproduce.

One token per forward pass, so it is also the "one-by-one" reference of the lossless rule; each step
records the top-2 logit gap, which tells whether a later divergence happened at a near-tie.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from verifier_server.acceptance import top2_gap
from verifier_server.backend import Backend, ForwardItem


@dataclass
class Reference:
    ids: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    text: bytes = b""
    finish_reason: str = "length"


def greedy_reference(backend: Backend, prompt: list[int], max_tokens: int, slot: int = 0) -> Reference:
    ref = Reference()
    step = backend.max_batch_tokens
    for start in range(0, len(prompt) - 1, step):
        backend.forward([ForwardItem(slot, start, prompt[start : min(start + step, len(prompt) - 1)], 0)])
    pos, last = len(prompt) - 1, prompt[-1]
    for _ in range(max_tokens):
        row = backend.forward([ForwardItem(slot, pos, [last], 1)])[0][0]
        last = int(row.argmax())
        ref.ids.append(last)
        ref.gaps.append(top2_gap(row))
        pos += 1
        if backend.text.is_eog(last):
            ref.finish_reason = "eos"
            break
        ref.text += backend.text.piece(last)
    return ref


# Batched and one-by-one forward passes differ in the last bits of the logits; a divergence from
# the reference is accepted only where the reference's top-2 logit gap is below this.
NEAR_TIE_GAP = 0.5


@dataclass
class Verdict:
    kind: str  # "identical", "near_tie" or "diverged"
    position: int = -1
    gap: float = 0.0


def judge(ids: list[int], ref: Reference) -> Verdict:
    """The lossless rule: ``ids`` equal the reference, or first differ where it was a near-tie."""
    n = min(len(ids), len(ref.ids))
    for i in range(n):
        if ids[i] != ref.ids[i]:
            kind = "near_tie" if ref.gaps[i] < NEAR_TIE_GAP else "diverged"
            return Verdict(kind, i, ref.gaps[i])
    if len(ids) != len(ref.ids):
        return Verdict("diverged", n, 0.0)
    return Verdict("identical")
