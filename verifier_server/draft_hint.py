"""The draft-length hint: how many tokens a device should draft next, from what the server measures.

A round with k draft tokens commits E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j tokens, where a_j is the
session's measured chance that draft position j is accepted once the ones before it were. Its cost
is what its k+1 positions add to the shared forward pass they ride in: t(X + k + 1) - t(X), where X
is the tokens the other sessions' rounds bring to a pass at the current load and t(B) the measured
cost curve of a pass of B tokens. The hint is the k with the most committed tokens per second of
server time. On a memory-bound GPU t(B) is flat, so long drafts are nearly free; on a compute-bound
CPU every position costs, and the hint falls to 0 (plain decoding) whenever drafts would cost more
than they save. The curve is a table, not a line: llama.cpp's CPU kernels change at some batch
sizes, and a linear fit would hide where batching pays.
"""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from verifier_server.scheduler import SchedulerStats
    from verifier_server.session import Session

PRIOR_ACCEPT = 0.6  # before a session has history: a typical cross-vocabulary acceptance
PRIOR_WEIGHT = 2.0
# Drafting must be predicted to beat plain decoding by this much. The cost model is good to about
# this: on the 2-core CPU at 8 devices a predicted 40% gain with a 5% margin measured 4% worse than
# plain; on a GPU the predicted gains are 2-3x, far above it.
MARGIN = 0.25
# Weight of a live pass when it refines the start-up measurement of its batch size.
LIVE_WEIGHT = 0.1


class CostCurve:
    """t(B), seconds of one forward pass of B tokens (logits at every position): measured at
    start-up at a few sizes, interpolated linearly between them, refined by live passes."""

    def __init__(self, points: dict[int, float]) -> None:
        self.sizes = sorted(points)
        self.seconds = [points[b] for b in self.sizes]

    def __call__(self, b: float) -> float:
        if b <= 0:
            return 0.0
        sizes, secs = self.sizes, self.seconds
        if b <= sizes[0]:
            return secs[0] * b / sizes[0]
        i = min(bisect.bisect_left(sizes, b), len(sizes) - 1)
        lo, hi = i - 1, i  # beyond the last size: extrapolate along the last segment
        slope = (secs[hi] - secs[lo]) / (sizes[hi] - sizes[lo])
        return secs[lo] + slope * (b - sizes[lo])

    def observe(self, b: int, seconds: float) -> None:
        """Nudge the measured size nearest to ``b`` (within 25%) towards a live pass."""
        i = min(range(len(self.sizes)), key=lambda j: abs(self.sizes[j] - b))
        if abs(self.sizes[i] - b) <= 0.25 * self.sizes[i]:
            scaled = seconds * self.sizes[i] / b
            self.seconds[i] += LIVE_WEIGHT * (scaled - self.seconds[i])

    def as_dict(self) -> dict[str, float]:
        return {str(b): round(t, 6) for b, t in zip(self.sizes, self.seconds)}


class DraftHint:
    def __init__(self, stats: "SchedulerStats", curve: CostCurve, max_draft_tokens: int) -> None:
        self.stats = stats
        self.curve = curve
        self.max_draft_tokens = max_draft_tokens
        self._seen = 0  # live passes already folded into the curve

    def observe(self, s: "Session", proposed: int, accepted: int) -> None:
        """Record one round: positions 1..accepted accepted, position accepted+1 rejected."""
        stats = s.position_stats
        while len(stats) < proposed:
            stats.append([0, 0])
        for i in range(min(proposed, accepted + 1)):
            stats[i][0] += 1
            stats[i][1] += i < accepted

    def acceptance(self, s: "Session", i: int) -> float:
        prop, acc = s.position_stats[i] if i < len(s.position_stats) else (0, 0)
        return (acc + PRIOR_ACCEPT * PRIOR_WEIGHT) / (prop + PRIOR_WEIGHT)

    def _load(self) -> float:
        """Fold new passes into the curve; return X, the tokens other rounds bring to a pass."""
        recent = list(self.stats.recent)
        new = min(self.stats.round_passes - self._seen, len(recent))
        for b, dt, _ in recent[len(recent) - new :]:
            self.curve.observe(b, dt)
        self._seen = self.stats.round_passes
        recent = recent[-32:]
        if not recent:
            return 0.0
        rounds = sum(r for _, _, r in recent)
        per_pass = rounds / len(recent)
        per_round = sum(b for b, _, _ in recent) / max(rounds, 1)
        return max(per_pass - 1.0, 0.0) * per_round

    def limit(self, s: "Session") -> int:
        """The draft length with the most committed tokens per second of server time."""
        others = self._load()
        base = self.curve(others)

        def cost(k: int) -> float:
            return max(self.curve(others + k + 1) - base, 1e-9)

        best_k, best_rate = 0, (1 + MARGIN) / cost(0)
        expected, survive = 1.0, 1.0
        for k in range(1, self.max_draft_tokens + 1):
            survive *= self.acceptance(s, k - 1)
            expected += survive
            rate = expected / cost(k)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k
