"""Percentiles of a stream of durations, kept in fixed log-spaced buckets.

``/v1/stats`` and ``/metrics`` report the engine's per-round overhead percentiles. Sorting a window
of the last 100,000 samples cost ~30 ms of the event loop per scrape, which a client scraping a few
dozen times a second turned into a stall of every round. A histogram records in O(1) and answers
in O(buckets), at a relative error of half a bucket (about 2.5%), which is well under the noise of
what it measures.
"""
from __future__ import annotations

import math

RATIO = 1.05  # each bucket's upper edge over its lower one
SMALLEST_S = 1e-6  # everything below falls in bucket 0
BUCKETS = math.ceil(math.log(1e3 / SMALLEST_S, RATIO)) + 1  # up to 1,000 s, then the last bucket


class DurationHistogram:
    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.count = 0

    def record(self, seconds: float) -> None:
        if seconds <= SMALLEST_S:
            i = 0
        else:
            i = min(BUCKETS - 1, 1 + int(math.log(seconds / SMALLEST_S, RATIO)))
        self.counts[i] += 1
        self.count += 1

    def quantile(self, q: float) -> float:
        """The duration below which a share ``q`` of the samples lies (a bucket's geometric
        middle; 0.0 before any sample)."""
        if not self.count:
            return 0.0
        rank = q * (self.count - 1)
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen > rank:
                return 0.0 if i == 0 else SMALLEST_S * RATIO ** (i - 0.5)
        return SMALLEST_S * RATIO ** (BUCKETS - 1.5)

    def summary_ms(self) -> dict[str, float]:
        """What ``/v1/stats`` reports: p50 and p95 in milliseconds, and the number of rounds."""
        return {"p50": round(self.quantile(0.5) * 1e3, 4), "p95": round(self.quantile(0.95) * 1e3, 4),
                "rounds": self.count}
