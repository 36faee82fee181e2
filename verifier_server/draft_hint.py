"""The draft-length hint: how many tokens a device should draft next, from what the server measures.

A round with k draft tokens commits E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j tokens, where a_j is the
session's measured chance that draft position j is accepted once the ones before it were. It costs
the server the marginal time of k+1 positions in a shared forward pass: c(k) = alpha/m + beta*(k+1),
with t(B) = alpha + beta*B fitted to recent forward passes and m the number of rounds that share a
pass. The hint is the k that maximizes E(k)/c(k): on a memory-bound server (beta small) long drafts
pay; on a loaded compute-bound one (alpha/m small against beta) it shrinks, down to 0 (plain decoding)
when drafts would cost more than they save.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from verifier_server.scheduler import SchedulerStats
    from verifier_server.session import Session

PRIOR_ACCEPT = 0.6  # before a session has history: a typical cross-vocabulary acceptance
PRIOR_WEIGHT = 2.0
# Drafting must beat plain decoding by this much: measurement noise must not tip a compute-bound
# server into speculation that costs more than it saves.
MARGIN = 0.05


class DraftHint:
    def __init__(self, stats: "SchedulerStats", max_draft_tokens: int) -> None:
        self.stats = stats
        self.max_draft_tokens = max_draft_tokens
        # t(B) = alpha + beta * B; replaced by a fit as soon as passes of different sizes were seen.
        self.alpha = 1.0
        self.beta = 0.0
        self._fitted_at = -1

    def observe(self, s: "Session", proposed: int, accepted: int) -> None:
        """Record one round: positions 1..accepted accepted, position accepted+1 rejected."""
        stats = s.position_stats
        while len(stats) < proposed:
            stats.append([0, 0])
        for i in range(min(proposed, accepted + 1)):
            stats[i][0] += 1
            stats[i][1] += i < accepted

    def seed_cost(self, alpha: float, beta: float) -> None:
        """Start-up calibration of the cost curve (seconds per pass, seconds per position)."""
        self.alpha, self.beta = max(alpha, 1e-6), max(beta, 0.0)

    def _refit(self) -> None:
        recent = list(self.stats.recent)
        if self.stats.forward_passes == self._fitted_at or len(recent) < 8:
            return
        self._fitted_at = self.stats.forward_passes
        n = len(recent)
        mx = sum(b for b, _, _ in recent) / n
        my = sum(t for _, t, _ in recent) / n
        var = sum((b - mx) ** 2 for b, _, _ in recent)
        if var < 1e-9:
            return  # all passes the same size: the start-up calibration stands
        beta = sum((b - mx) * (t - my) for b, t, _ in recent) / var
        alpha = my - beta * mx
        if alpha > 0 and beta >= 0:
            self.alpha, self.beta = alpha, beta

    def acceptance(self, s: "Session", i: int) -> float:
        prop, acc = s.position_stats[i] if i < len(s.position_stats) else (0, 0)
        return (acc + PRIOR_ACCEPT * PRIOR_WEIGHT) / (prop + PRIOR_WEIGHT)

    def limit(self, s: "Session") -> int:
        """The draft length with the most committed tokens per second of server time."""
        self._refit()
        recent = list(self.stats.recent)[-32:]
        rounds_per_pass = sum(r for _, _, r in recent) / len(recent) if recent else 1.0
        fixed = self.alpha / max(rounds_per_pass, 1.0)
        plain_rate = 1.0 / (fixed + self.beta)
        best_k, best_rate = 0, plain_rate * (1 + MARGIN)
        expected, survive = 1.0, 1.0
        for k in range(1, self.max_draft_tokens + 1):
            survive *= self.acceptance(s, k - 1)
            expected += survive
            rate = expected / (fixed + self.beta * (k + 1))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k
