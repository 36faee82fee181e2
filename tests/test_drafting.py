"""The device's drafting logic without a model: the draft controller (fed measured timings, as a
fake clock would give them) and the n-gram drafter."""
from __future__ import annotations

import pytest

from edge_agent.controller import CONFIDENCE_BINS, PROBE_DRAFT, DraftController
from edge_agent.ngram import NgramDrafter


def feed(c: DraftController, rounds: int, drafted: int, accepted: int, step_ms: float, rtt_ms: float,
         server_ms: float, confidences: list[float] | None = None) -> None:
    for _ in range(rounds):
        c.observe(drafted, accepted, confidences or [0.9] * drafted, draft_s=drafted * step_ms / 1e3,
                  latency_s=(rtt_ms + server_ms) / 1e3, server_s=server_ms / 1e3, target_tokens=drafted)


def test_a_short_probe_then_the_hint_decides_before_the_timings_do():
    c = DraftController(cap=10)
    assert c.choose(6).k == PROBE_DRAFT and c.choose(1).k == 1  # nothing measured yet: a probe, within the hint
    feed(c, 1, drafted=PROBE_DRAFT, accepted=1, step_ms=5, rtt_ms=80, server_ms=20)
    # the probe paid (a slow link): the warm-up doubles its length, within the hint and the cap
    assert c.choose(3).k == 3 and c.choose(20).k == 6 and c.choose(20).k == 10


def test_a_slow_link_and_good_acceptance_ask_for_long_drafts():
    c = DraftController(cap=12)
    feed(c, 30, drafted=8, accepted=8, step_ms=2, rtt_ms=80, server_ms=20)
    assert c.choose(12).k >= 10  # beyond 8 tokens only the prior speaks (0.6 a position)
    assert c.choose(5).k == 5  # never beyond the server's hint


def test_a_slow_drafter_and_poor_acceptance_ask_for_short_drafts():
    c = DraftController(cap=12)
    feed(c, 30, drafted=6, accepted=0, step_ms=50, rtt_ms=5, server_ms=20)
    decision = c.choose(12)
    assert decision.k <= 1
    assert c.acceptances()[0] < 0.1


def test_the_best_length_grows_with_the_round_trip():
    """The same drafter and acceptance: a longer round trip makes each round dearer, so more
    tokens per round pay."""
    # 100 rounds of 16-token drafts whose accepted prefix is geometric: 0.8 a position.
    accepted = [j for j in range(16) for _ in range(round(100 * (0.8**j - 0.8 ** (j + 1))))]
    choices = []
    for rtt in (0, 20, 80, 300):
        c = DraftController(cap=16)
        for a in accepted:
            c.observe(16, a, [0.9] * 16, draft_s=16 * 0.015, latency_s=(rtt + 30) / 1e3, server_s=0.03,
                      target_tokens=16)
        choices.append(c.choose(16).k)
    assert choices == sorted(choices) and choices[0] < choices[-1], choices


def test_pipelined_steps_are_free():
    c = DraftController(cap=12)
    feed(c, 30, drafted=6, accepted=3, step_ms=40, rtt_ms=10, server_ms=10)
    assert c.choose(12, free_steps=8).k > c.choose(12).k


def test_pipelined_a_draft_is_shorter_for_the_look_ahead_it_buys():
    """With look-ahead, a short draft is more often fully accepted, and then the next round's draft
    is already there: the controller drafts shorter than without it, where the round trip makes
    long drafts pay, and its expected rate counts the look-ahead rounds."""
    accepted = [j for j in range(12) for _ in range(round(100 * (0.8**j - 0.8 ** (j + 1))))]
    plain, pipelined = DraftController(cap=12), DraftController(cap=12, lookahead=True)
    for c in (plain, pipelined):
        for a in accepted:
            c.observe(12, a, [0.9] * 12, draft_s=12 * 0.008, latency_s=0.105, server_s=0.022, target_tokens=12)
    short, long = pipelined.choose(12).k, plain.choose(12).k
    assert short < long, (short, long)
    reaches = pipelined.reaches()
    assert pipelined.rate(short, 12, reaches) > plain.rate(short, 12, reaches)


def test_chained_look_ahead_rounds_cost_drafting_steps_not_a_round_trip():
    """Once a chained round has been answered, a look-ahead round is valued at the steps that
    draft it, not at a round trip: each length then predicts a higher rate, and the chained
    round's own times (it waited behind the round before it) leave the link's estimate alone."""
    accepted = [j for j in range(12) for _ in range(round(100 * (0.8**j - 0.8 ** (j + 1))))]
    waiting, chaining = DraftController(cap=12, lookahead=True), DraftController(cap=12, lookahead=True)
    for c in (waiting, chaining):
        for a in accepted:
            c.observe(12, a, [0.9] * 12, draft_s=12 * 0.008, latency_s=0.105, server_s=0.022, target_tokens=12)
    rtt = chaining.rtt_s
    chaining.observe(4, 4, [0.9] * 4, draft_s=0.0, latency_s=0.5, server_s=0.02, target_tokens=4, ready=4,
                     committed=5, wall_s=0.05, chained=True)
    assert chaining.chained_lookahead and not waiting.chained_lookahead and chaining.rtt_s == rtt
    reaches = chaining.reaches()
    assert all(chaining.rate(k, 12, reaches) > waiting.rate(k, 12, reaches) for k in range(1, 12))


def test_drafting_never_costs_the_plain_speed_that_rounds_measure():
    """A fast verifier on a short link: the model predicts a small gain from drafting, so measured
    rates decide. Rounds without a draft are sent now and then, and win when they measure faster."""
    def rounds(c: DraftController, plain_ms: float, draft_ms: float) -> list[int]:
        ks = []
        for _ in range(40):
            k = c.choose(6).k
            ks.append(k)
            c.observe(k, min(k, 2), [0.9] * k, draft_s=k * 0.02, latency_s=0.024, server_s=0.022,
                      target_tokens=k, committed=3 if k else 1, wall_s=(draft_ms if k else plain_ms) / 1e3)
        return ks[-16:]

    assert rounds(DraftController(cap=6), plain_ms=25, draft_ms=100).count(0) >= 14  # all but explorations, if any
    settled = rounds(DraftController(cap=6), plain_ms=25, draft_ms=50)
    assert settled.count(0) <= 2 and max(settled) > 0


def test_the_warm_up_ends_early_where_the_hints_drafts_lose_to_rounds_without_one():
    """A slow drafter (20 ms a step) next to a GPU-timed verifier on a short link: the first
    round's short probe already measures slower than a round without a draft is predicted to be,
    so the controller never drafts the hint's 10 tokens (each such round would cost ~9 rounds
    without a draft). A fast drafter warms up for all 8 rounds, doubling up to the hint."""
    def first_choices(step_ms: float) -> list[int]:
        c, ks = DraftController(cap=10), []
        for _ in range(8):
            k = c.choose(10).k
            ks.append(k)
            c.observe(k, min(k, 1), [0.9] * k, draft_s=k * step_ms / 1e3, latency_s=0.024, server_s=0.022,
                      target_tokens=k, committed=min(k, 1) + 1, wall_s=(k * step_ms + 24) / 1e3)
        return ks

    slow, fast = first_choices(20.0), first_choices(0.5)
    assert slow[0] == PROBE_DRAFT and max(slow[1:]) < 10, slow
    assert fast == [PROBE_DRAFT, 4, 8] + [10] * 5, fast  # doubling up to the hint


def _simulate(c: DraftController, rounds: int, accept: float, step_ms: float, rtt_ms: float, server_ms: float,
              prefill_ms: float, unlucky_first: bool) -> list[int]:
    """The controller's choices over ``rounds`` rounds of a link and a board: position j of a draft
    accepted with chance ``accept`` (deterministically: the expected accepted prefix, rounded), the
    drafter's prefill paid by its first draft (the prompt) and after rounds without a draft (the
    text they committed: 5 ms a round); ``unlucky_first``: the first draft is rejected outright."""
    ks, behind = [], 0
    for _ in range(rounds):
        k = c.choose(10).k
        ks.append(k)
        if k:
            accepted = 0 if unlucky_first and not any(ks[:-1]) else min(k, round(sum(accept ** (j + 1) for j in range(k))))
            prefill = (prefill_ms if not any(ks[:-1]) else 5.0 * behind) / 1e3
            behind = 0
        else:
            accepted, prefill = 0, 0.0
            behind += 1
        wall = prefill + (k * step_ms + rtt_ms + server_ms) / 1e3
        c.observe(k, accepted, [0.9] * k, draft_s=prefill + k * step_ms / 1e3, latency_s=(rtt_ms + server_ms) / 1e3,
                  server_s=server_ms / 1e3, target_tokens=k, committed=accepted + 1, wall_s=wall, prefill_s=prefill)
    return ks


def test_an_unlucky_first_probe_does_not_end_drafting():
    """The case that made the controller give up (80 ms round trip, a GPU-timed verifier, a fast
    drafter): the first probe pays the drafter's prompt prefill and is rejected, slower than a
    round without a draft. One sample is not a verdict: the controller probes again, learns that
    drafting pays, and drafts from then on."""
    ks = _simulate(DraftController(cap=10, lookahead=True), 64, accept=0.8, step_ms=8, rtt_ms=80, server_ms=22,
                   prefill_ms=150, unlucky_first=True)
    assert ks[0] == PROBE_DRAFT
    assert sum(k > 0 for k in ks[16:]) >= 44 and sum(ks[16:]) / 48 >= 2, ks


def test_a_single_drafted_round_never_rules_drafting_out():
    c = DraftController(cap=10)
    c.observe(2, 0, [0.9, 0.9], draft_s=0.2, latency_s=0.1, server_s=0.02, target_tokens=2, committed=1, wall_s=0.3)
    for _ in range(5):
        c.observe(0, 0, [], draft_s=0.0, latency_s=0.1, server_s=0.02, target_tokens=0, committed=1, wall_s=0.1)
    assert not c.plain_measures_faster()  # 1 drafted round against 5 plain ones: no verdict yet
    for _ in range(2):
        c.observe(2, 0, [0.9, 0.9], draft_s=0.2, latency_s=0.1, server_s=0.02, target_tokens=2, committed=1,
                  wall_s=0.3)
    assert c.plain_measures_faster()  # three of them: now it is evidence


def test_explorations_keep_drafting_while_plain_rounds_measure_faster():
    """A slow board next to a fast verifier: rounds without a draft win, yet every exploration still
    drafts a short probe, so a link that gets slower later would be noticed."""
    ks = _simulate(DraftController(cap=10), 200, accept=0.6, step_ms=30, rtt_ms=5, server_ms=20, prefill_ms=100,
                   unlucky_first=False)
    late = ks[64:]
    assert late.count(0) >= len(late) * 0.9  # plain decoding, nearly always
    assert sum(k > 0 for k in late) > 0 and max(late) <= PROBE_DRAFT  # but probes go on, short and rare


def test_the_confidence_threshold_is_learned_from_rejections():
    c = DraftController(cap=8)
    assert c.threshold() == 0.0  # nothing learned: never stop early
    for _ in range(50):  # tokens drafted at confidence 0.1 are rejected, at 0.9 accepted
        c.observe(3, 2, [0.9, 0.9, 0.1], draft_s=0.01, latency_s=0.05, server_s=0.01, target_tokens=3)
    assert 0.1 < c.threshold() <= 0.9
    assert c.choose(8).threshold == c.threshold()
    assert sum(c.bin_offered) == 150 and len(c.bin_offered) == CONFIDENCE_BINS


def test_decisions_are_reported():
    c = DraftController(cap=8)
    feed(c, 5, drafted=4, accepted=2, step_ms=5, rtt_ms=20, server_ms=10)
    d = c.choose(8).as_dict()
    assert set(d) == {"k", "hint", "expected_tokens", "expected_ms", "threshold"} and d["hint"] == 8


# --- n-gram drafter -------------------------------------------------------------------------------
CODE = b"def area(r):\n    return 3.14159 * r * r\n\ndef volume(r, h):\n    return area(r) * h\n"


def test_ngram_proposes_what_followed_before_by_chained_lookups():
    d = NgramDrafter()
    d.start(CODE.decode(), None)
    d.commit(b"\ndef area(r):\n")
    proposal = d.propose(64)
    assert proposal.text.startswith(b"    return 3.14159 * r * r\n")  # longer than one follower: chained
    assert len(proposal.text) > 24 and proposal.long_bytes > 0


def test_ngram_learns_from_committed_text_and_persists_across_generations():
    d = NgramDrafter()
    d.start("unrelated prompt", None)
    assert d.propose(16).text == b""  # nothing seen yet
    d.commit(b' {"level": "info", "msg": "ok"}\n')
    d.start("new", None)  # a new generation keeps the table
    d.commit(b' {"level": ')
    assert d.propose(8).text == b'"info", '


def test_ngram_memory_is_bounded():
    d = NgramDrafter(max_entries=100)
    d.start("x", None)
    d.commit(bytes(range(256)) * 4)
    assert all(len(t) <= 100 for t in d.tables.values())


@pytest.mark.parametrize("k", [0, 1, 5])
def test_ngram_draft_is_k_bytes_at_most(k):
    d = NgramDrafter()
    d.start(CODE.decode() * 2, None)
    pieces = d.draft_pieces(k)
    assert len(pieces) <= k and all(len(p) == 1 for p in pieces)
