"""The lossless rule, as the tests and the benchmark judge it.

Every committed token is the argmax of the verifier's own logits at its position, by construction.
Against a plain autoregressive run of the same target, outputs are identical, or the first
divergence falls at a near-tie: batched and one-by-one forward passes differ in the last bits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# A divergence from the reference is accepted only where the reference's top-2 logit gap is below
# this.
NEAR_TIE_GAP = 0.5
# How far a committed token may trail the argmax of a one-token-at-a-time pass over the same ids:
# the verifier's logits come from passes of a few tokens, whose numerics differ from one-by-one
# passes by up to 0.57 (measured on Gemma-3-270M Q4; a single batch over the whole text differs by
# up to 0.64). A committed token that is not the verifier's own argmax trails by whole logits.
TEACHER_FORCED_MARGIN = 1.0


@dataclass
class Reference:
    """Plain decoding of a target: its ids, text and, at every step, the margin of its choice (in
    logits: the top-2 gap when greedy, the gap between the best two perturbed scores when sampling)."""

    ids: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    text: bytes = b""
    finish_reason: str = "length"


@dataclass
class Verdict:
    kind: str  # "identical", "near_tie" or "diverged"
    position: int = -1
    gap: float = 0.0


def judge(ids: list[int], ref: Reference) -> Verdict:
    """The lossless rule: ``ids`` equal the reference, or first differ where its choice was a
    near-tie (greedy or seeded sampling alike: see ``shared.sampling``)."""
    n = min(len(ids), len(ref.ids))
    for i in range(n):
        if ids[i] != ref.ids[i]:
            kind = "near_tie" if ref.gaps[i] < NEAR_TIE_GAP else "diverged"
            return Verdict(kind, i, ref.gaps[i])
    if len(ids) != len(ref.ids):
        return Verdict("diverged", n, 0.0)
    return Verdict("identical")
