"""The draft-length hint: how many target tokens a device's next draft is worth, from what the
server measures.

A round with k draft tokens commits E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j tokens, where a_j is the
session's measured chance that draft position j is accepted once the ones before it were. Its cost
is what its k+1 positions add to the shared forward pass they ride in (the runner's ``RoundCost``,
see ``cost_curve``). The hint is the k with the most committed tokens per second of server time. On
a memory-bound GPU passes cost the same up to many tokens, so long drafts are nearly free; on a
compute-bound CPU every position costs, and the hint falls to 0 (plain decoding) whenever drafts
would cost more than they save.

The hint is a *recommendation* in target tokens; the agent converts it into its own tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from verifier_server.cost_curve import RoundCost

PRIOR_ACCEPT = 0.6  # before a session has history: a typical cross-vocabulary acceptance
PRIOR_WEIGHT = 2.0
# Drafting must be predicted to beat plain decoding by this much. The cost model is good to about
# this: on the 2-core CPU at 8 devices a predicted 40% gain with a 5% margin measured 4% worse than
# plain; on a GPU the predicted gains are 2-3x, far above it.
MARGIN = 0.25


@dataclass
class AcceptanceHistory:
    """Per draft position of one session: how often it was proposed and accepted."""

    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def observe(self, proposed: int, accepted: int) -> None:
        """Record one round: positions 1..accepted accepted, position accepted+1 rejected."""
        while len(self.proposed) < proposed:
            self.proposed.append(0)
            self.accepted.append(0)
        for i in range(min(proposed, accepted + 1)):
            self.proposed[i] += 1
            self.accepted[i] += i < accepted

    def rate(self, i: int) -> float:
        """Chance that position i (from 0) is accepted once the ones before it were."""
        prop, acc = (self.proposed[i], self.accepted[i]) if i < len(self.proposed) else (0, 0)
        return (acc + PRIOR_ACCEPT * PRIOR_WEIGHT) / (prop + PRIOR_WEIGHT)


def recommend(history: AcceptanceHistory, cost: RoundCost, max_draft_tokens: int) -> int:
    """The draft length with the most committed tokens per second of server time (0: none)."""
    best_k, best_rate = 0, (1 + MARGIN) / cost(1)
    expected, survive = 1.0, 1.0
    for k in range(1, max_draft_tokens + 1):
        survive *= history.rate(k - 1)
        expected += survive
        rate = expected / cost(k + 1)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k
