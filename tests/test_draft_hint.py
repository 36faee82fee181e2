"""The draft-length hint's decisions on measured cost curves (arithmetic only, no model)."""
from __future__ import annotations

import pytest

from edge_agent.agent import DraftLength
from verifier_server.cost_curve import CostCurve, LoadModel, PassRecord
from verifier_server.draft_hint import AcceptanceHistory, recommend


def _cost(points: dict[int, float], passes: list[PassRecord] = ()):
    load = LoadModel(CostCurve(points))
    load.update(passes)
    return load.round_cost()


def test_curve_interpolates_and_extrapolates():
    curve = CostCurve({1: 0.05, 2: 0.1, 4: 0.17, 8: 0.41, 16: 0.48})
    assert curve(0) == 0.0
    assert curve(3) == pytest.approx(0.135)
    assert curve(32) == pytest.approx(0.48 + 16 * (0.48 - 0.41) / 8)
    curve.observe(15, 0.40)  # nudges the 16-token point towards a live pass
    assert 0.47 < curve(16) < 0.48


def test_memory_bound_server_gets_long_drafts():
    cost = _cost({1: 0.003, 8: 0.003, 64: 0.0031})  # a GPU: flat up to many tokens
    assert recommend(AcceptanceHistory(), cost, 16) >= 8


def test_compute_bound_server_gets_no_drafts():
    cost = _cost({1: 0.05, 2: 0.1, 4: 0.2, 8: 0.4, 16: 0.8})  # a CPU: every position costs
    assert recommend(AcceptanceHistory(), cost, 16) == 0


def test_hint_follows_the_sessions_acceptance():
    cost = _cost({1: 0.05, 2: 0.06, 4: 0.08, 8: 0.12, 16: 0.2})
    good, bad = AcceptanceHistory(), AcceptanceHistory()
    for _ in range(50):
        good.observe(proposed=8, accepted=8)
        bad.observe(proposed=8, accepted=0)
    assert recommend(good, cost, 16) > 4
    assert recommend(bad, cost, 16) == 0


def test_a_round_costs_what_it_adds_to_a_shared_pass():
    points = {1: 0.01, 8: 0.01, 16: 0.02, 32: 0.04}
    alone = _cost(points)
    shared = _cost(points, [PassRecord(tokens=16, seconds=0.02, rounds=4)] * 8)  # 3 other rounds of 4
    assert alone(1) == pytest.approx(0.01 / 1 * 1)
    assert shared(4) == pytest.approx(points[16] - CostCurve(points)(12), rel=0.05)


def test_the_agent_converts_the_hint_into_its_own_tokens():
    length = DraftLength(cap=10)
    assert length.for_hint(0) == 0
    assert length.for_hint(6) == 6  # no evidence yet: one drafter token per target token
    for _ in range(20):  # this drafter's tokens are half as long: two per target token
        length.observe(drafter_tokens=8, target_tokens=4)
    assert length.for_hint(3) == 6
    assert length.for_hint(8) == 10  # never beyond the agent's own cap
