"""Pearson's chi-square goodness-of-fit test for the sampling tests (no scipy here)."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping


def chi_square(observed: Counter, expected: Mapping[Hashable, float], n: int) -> tuple[float, int, float]:
    """Pearson's statistic of ``n`` observations against ``expected`` probabilities, its degrees
    of freedom and p-value (Wilson-Hilferty). Cells expected at least 5 times are tested one by
    one, the rest pooled (tested when that pool is expected 5 times). Observations where nothing
    was expected at all make the statistic infinite."""
    big = [c for c, p in expected.items() if n * p >= 5]
    rest_p = 1.0 - sum(expected[c] for c in big)
    rest_o = n - sum(observed.get(c, 0) for c in big)
    stat = sum((observed.get(c, 0) - n * expected[c]) ** 2 / (n * expected[c]) for c in big)
    pooled = n * rest_p >= 5
    if pooled:
        stat += (rest_o - n * rest_p) ** 2 / (n * rest_p)
    elif rest_o > 0 and rest_p <= 1e-12:
        return math.inf, len(big) - 1, 0.0
    k = len(big) - (0 if pooled else 1)
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return stat, k, 0.5 * math.erfc(z / math.sqrt(2))
