"""The draft-length hint's decisions on measured cost curves (arithmetic only, no model)."""
from __future__ import annotations

import pytest

from verifier_server.draft_hint import CostCurve, DraftHint
from verifier_server.scheduler import SchedulerStats
from verifier_server.session import Session


def _session() -> Session:
    return Session(prompt_len=1, ids=[1], max_tokens=64, stop=[])


def _hint(points: dict[int, float]) -> DraftHint:
    return DraftHint(SchedulerStats(), CostCurve(points), max_draft_tokens=16)


def test_curve_interpolates_and_extrapolates():
    curve = CostCurve({1: 0.05, 2: 0.1, 4: 0.17, 8: 0.41, 16: 0.48})
    assert curve(0) == 0.0
    assert curve(3) == pytest.approx(0.135)
    assert curve(32) == pytest.approx(0.48 + 16 * (0.48 - 0.41) / 8)
    curve.observe(15, 0.40)  # nudges the 16-token point towards a live pass
    assert 0.47 < curve(16) < 0.48


def test_memory_bound_server_gets_long_drafts():
    hint = _hint({1: 0.003, 8: 0.003, 64: 0.0031})  # a GPU: flat up to many tokens
    s = _session()
    assert hint.limit(s) >= 8


def test_compute_bound_server_gets_no_drafts():
    hint = _hint({1: 0.05, 2: 0.1, 4: 0.2, 8: 0.4, 16: 0.8})  # a CPU: every position costs
    s = _session()
    assert hint.limit(s) == 0


def test_hint_follows_the_sessions_acceptance():
    hint = _hint({1: 0.05, 2: 0.06, 4: 0.08, 8: 0.12, 16: 0.2})
    good, bad = _session(), _session()
    for _ in range(50):
        hint.observe(good, proposed=8, accepted=8)
        hint.observe(bad, proposed=8, accepted=0)
    assert hint.limit(good) > 4
    assert hint.limit(bad) == 0
