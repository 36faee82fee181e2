"""What a round costs the server: the cost curve t(B) of a forward pass and the marginal cost of a
round at the current load. Pure arithmetic: a runner owns one model, fed with its measurements.

A round of n positions rides in a pass with the rounds of other sessions; it costs what it adds to
that pass, t(X + n) - t(X), X being the tokens the other rounds bring at the current load. The
curve is a table, not a line: llama.cpp's CPU kernels change at some batch sizes, and a linear fit
would hide where batching pays.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Seconds that a round of ``n`` positions (last committed token plus n - 1 candidates) adds to the
# pass it rides in, at the current load.
RoundCost = Callable[[int], float]

# Weight of a live pass when it refines the start-up measurement of its batch size.
LIVE_WEIGHT = 0.1
# Passes that describe "the current load".
LOAD_WINDOW = 32


@dataclass(frozen=True)
class PassRecord:
    """One forward pass made of verify rounds only (a prefill would make positions look cheap)."""

    tokens: int
    seconds: float
    rounds: int


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


class LoadModel:
    """The curve plus the recent passes: prices a round at its marginal cost under today's load."""

    def __init__(self, curve: CostCurve) -> None:
        self.curve = curve
        self._recent: list[PassRecord] = []

    def update(self, new_passes: Iterable[PassRecord]) -> None:
        """Fold passes not seen before into the curve and the load window."""
        for p in new_passes:
            self.curve.observe(p.tokens, p.seconds)
            self._recent.append(p)
        del self._recent[:-LOAD_WINDOW]

    def others(self) -> float:
        """X: the tokens that other sessions' rounds bring to a pass at the current load."""
        if not self._recent:
            return 0.0
        rounds = sum(p.rounds for p in self._recent)
        per_pass = rounds / len(self._recent)
        per_round = sum(p.tokens for p in self._recent) / max(rounds, 1)
        return max(per_pass - 1.0, 0.0) * per_round

    def round_cost(self) -> RoundCost:
        return marginal_cost(self.curve, self.others())


def marginal_cost(curve: CostCurve, others: float) -> RoundCost:
    """A round's price: what its n positions add to a pass that ``others`` tokens fill already."""
    base = curve(others)
    return lambda n: max(curve(others + n) - base, 1e-9)
