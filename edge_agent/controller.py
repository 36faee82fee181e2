"""The device's draft controller: how many tokens to draft this round, and when to stop early.

The server's hint says what pays for *its* capacity; the device also pays for its own time: a
draft step on a Raspberry Pi costs 50 ms, a round trip over Wi-Fi 20-100 ms. The controller
measures, from its own rounds:

- ``a_j``: the chance that draft position j is accepted once positions before it were (counts,
  with position j-1's estimate as the prior of position j, and the full hint drafted every 8th
  round so that far positions keep being measured);
- the drafter's step time, the network's round-trip time (latency minus the verifier's time, which
  each answer reports) and the verifier's time per round as a function of the draft length;

and picks the k that maximises expected committed tokens per second of the device's wall time,
E(k) / T(k) with E(k) = 1 + sum_i prod_{j<=i} a_j and T(k) = k * step + rtt + server(k), capped by
the server's hint (the server's capacity comes first). With pipelined drafting the steps drafted
while the round was in flight cost nothing, so they are left out of T.

Pipelined (``lookahead``), a round also buys the next one's draft: while it is in flight the device
drafts on as if it will be fully accepted, and when it is (and the verifier's bonus token is the one
the drafter predicted: position k+1 accepted, probability reach(k+1)) the next round opens with
that look-ahead, drafted for free. A short draft is fully accepted more often, so it is worth more
than E(k)/T(k) says. The controller scores k by the rate of the two-state chain "this round, then
look-ahead rounds while they keep being fully accepted":

    rate(k) = (E(k) + r E_C) / (T(k) + r T_C),   r = p / (1 - q),

with p = reach(k+1), E_C and T_C a look-ahead round's tokens and time (its draft is as long as the
in-flight time allows, no drafting time of its own), and q its own chance to be fully accepted.
Where the verifier takes chained rounds (seen from the first one answered), the look-ahead does not
wait for the answer: it is sent as the next round once a bet and ``chained_draft(k)`` tokens are
drafted, so a look-ahead round costs those steps, T_C = (chained_draft(k) + 1) * step, not a
round trip (or the verifier's time for it, where that is longer: a chained round is verified
after the round before it), and E_C, q are those of that length.

The model leaves out what a round costs beyond drafting and the wire (re-tokenizing the answer,
the drafter catching up on the bonus token), and counts drafter tokens, not committed ones. So the
controller also measures committed tokens per second of wall time, all included, for rounds with
a draft of its choosing and without a draft. Where drafted rounds measure less than 1.3x what the
model predicts for rounds without a draft (a fast verifier on a short link), it sends a round
without a draft now and then, and drafts nothing while those measure faster: drafting never costs
the device its plain speed. Rounds that drafted the hint (the warm-up, explorations) are measured
apart, so that their long drafts do not make the controller's short ones look slow. The warm-up
opens with a short probe (``PROBE_DRAFT`` tokens), which measures the board and the link for
little more than a round without a draft costs; while the warm-up measures slower than the model
predicts for rounds without a draft (a slow drafter next to a fast verifier, or an unlucky probe),
it goes on probing short instead of drafting the hint, and it ends there once ``MIN_SAMPLES``
rounds say so. No measured rate rules drafting out before ``MIN_SAMPLES`` rounds stand behind it:
a single probe that was rejected, or that paid the drafter's prefill, is one sample, not a verdict.
The drafter's prefill (the prompt, or text committed while it did not draft) is kept out of the
step time: it is not a step. The prompt's prefill is kept out of the first drafted round's wall
time too (a one-off); a later catch-up is what switching to drafting costs, and counts. While
rounds without a draft measure faster, the explorations come four times less often, and half as
often again after each one that confirms it (down to one in ``MAX_EXPLORE_EVERY`` rounds), and
each still drafts (at least a probe): drafting keeps being measured, at a cost that shrinks as the
evidence grows.

It also learns a confidence threshold: the acceptance of drafted tokens binned by the drafter's own
top probability. A draft stops at the first token whose bin accepts less than ``min_acceptance``
(low confidence: likely rejected, and every later token with it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

CONFIDENCE_BINS = 10
PRIOR_ACCEPTANCE = 0.6  # a new device's guess, worth PRIOR_WEIGHT rounds of evidence
PRIOR_WEIGHT = 2.0
EMA = 0.2  # weight of the newest sample in the time averages
MIN_EVIDENCE = 5  # tokens in a confidence bin before its acceptance counts
EXPLORE_EVERY = 8  # every 8th round drafts the full hint, to keep measuring the far positions
PLAIN_BACKOFF = 4  # and only every 32nd while rounds without a draft measure faster
WARMUP_ROUNDS = 8  # drafted rounds measured before the controller overrules the hint
PROBE_DRAFT = 2  # the first of them drafts this much: before any timing, a long draft may cost a lot
PLAIN_CHECK_GAIN = 1.3  # drafted rounds measuring below this gain over no draft: measured rates decide
PLAIN_EVERY = 8  # and every 8th round (offset from the exploration) sends no draft
MIN_CHAINED_DRAFT = 2  # a chained round drafts at least this many tokens after its bet
MIN_SAMPLES = 3  # rounds of a kind measured before their rate may rule drafting out
MAX_EXPLORE_EVERY = 256  # the rarest explorations, once rounds without a draft keep measuring faster


def chained_draft(k: int) -> int:
    """The draft length of a round chained behind a round with a k-token draft: as long, at least
    ``MIN_CHAINED_DRAFT`` (drafter tokens, after the bonus token's guess)."""
    return max(k, MIN_CHAINED_DRAFT)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


@dataclass
class _Throughput:
    """Committed tokens per second of the device's wall time, all costs included, over recent rounds
    of one kind (averaged as tokens over seconds, so that long rounds weigh what they cost)."""

    tokens: float | None = None
    seconds: float | None = None
    samples: int = 0

    def observe(self, tokens: int, seconds: float) -> None:
        self.tokens, self.seconds = _ema(self.tokens, tokens), _ema(self.seconds, seconds)
        self.samples += 1

    @property
    def settled(self) -> bool:
        """Whether enough rounds were measured for the rate to be evidence, not an anecdote."""
        return self.samples >= MIN_SAMPLES

    @property
    def rate(self) -> float | None:
        return None if self.tokens is None or not self.seconds else self.tokens / self.seconds


@dataclass
class Decision:
    """One round's choice, for the agent's ``--json`` output."""

    k: int  # drafter tokens asked for
    hint: int  # the server's cap, in drafter tokens
    expected_tokens: float
    expected_s: float
    threshold: float  # the confidence below which the draft stops

    def as_dict(self) -> dict:
        return {"k": self.k, "hint": self.hint, "expected_tokens": round(self.expected_tokens, 3),
                "expected_ms": round(self.expected_s * 1e3, 2), "threshold": round(self.threshold, 3)}


@dataclass
class DraftController:
    cap: int  # the longest draft the device offers (drafter tokens)
    min_acceptance: float = 0.2  # stop drafting where the learned acceptance falls below this
    reached: list[float] = field(default_factory=list)  # per position: rounds where it was drafted and reachable
    accepted: list[float] = field(default_factory=list)
    bin_offered: list[float] = field(default_factory=lambda: [0.0] * CONFIDENCE_BINS)
    bin_accepted: list[float] = field(default_factory=lambda: [0.0] * CONFIDENCE_BINS)
    step_s: float | None = None  # one draft step
    rtt_s: float | None = None  # the network's share of a round
    server_base_s: float | None = None  # the verifier's time for a round without a draft
    server_per_token_s: float = 0.0  # and what each draft token adds
    lookahead: bool = False  # pipelined drafting: value short drafts for the look-ahead they buy
    chained_lookahead: bool = False  # the look-ahead goes out as chained rounds (one has been answered)
    plain: _Throughput = field(default_factory=_Throughput)  # measured: rounds without a draft
    drafting: _Throughput = field(default_factory=_Throughput)  # and rounds with one of the controller's length
    warmup: _Throughput = field(default_factory=_Throughput)  # and rounds that drafted the hint (warm-up, exploration)
    decisions: int = 0
    observed: int = 0  # rounds with a draft, measured
    forced: bool = False  # the last round was a warm-up or an exploration, not the model's choice
    warmup_k: int = 0  # the length of the last such round
    since_explore: int = 0  # rounds since the last exploration
    backoff: int = 1  # explorations that found rounds without a draft faster, as a factor (1, 2, 4, ...)

    def __post_init__(self) -> None:
        self.reached = self.reached or [0.0] * self.cap
        self.accepted = self.accepted or [0.0] * self.cap

    # --- learning ---------------------------------------------------------------------------------
    def acceptances(self) -> list[float]:
        """Each position's acceptance; its prior is position j-1's estimate (acceptance tends to
        hold or rise along a draft: a draft that got this far follows predictable text), so
        positions rarely drafted are not undervalued for want of evidence."""
        out, estimate = [], PRIOR_ACCEPTANCE
        for accepted, reached in zip(self.accepted, self.reached):
            estimate = (accepted + estimate * PRIOR_WEIGHT) / (reached + PRIOR_WEIGHT)
            out.append(estimate)
        return out

    def observe(self, drafted: int, accepted: int, confidences: list[float], draft_s: float, latency_s: float,
                server_s: float, target_tokens: int, ready: int = 0, committed: int = 0,
                wall_s: float = 0.0, chained: bool = False, prefill_s: float = 0.0, asked: int | None = None) -> None:
        """One round: ``drafted`` drafter tokens sent, the first ``accepted`` of them accepted, each
        drafted with the drafter's ``confidences``; ``draft_s`` of drafting that the round waited
        for (``ready`` of the tokens were drafted ahead, at no cost), ``latency_s`` from sending to
        the answer, ``server_s`` of it in the verifier, which verified ``target_tokens`` candidates;
        ``committed`` target tokens in ``wall_s`` of the device's time, all included. A ``chained``
        round waited in the verifier behind the round before it: its times say nothing of the
        link's or the verifier's, only its acceptance and throughput count. ``prefill_s`` of the
        drafting time was the drafter's catch-up on context: left out of the step time, and of
        the wall time (the agent passes it where it is a one-off: the prompt's prefill). ``asked``:
        the draft length chosen (default ``drafted``): a draft that the confidence threshold cut to
        nothing still cost its drafting, so the round counts as a drafted one."""
        draft_s, wall_s = max(draft_s - prefill_s, 0.0), max(wall_s - prefill_s, 0.0)
        if wall_s > 0:
            kind = (self.warmup if self.forced else self.drafting) if drafted or asked else self.plain
            kind.observe(committed, wall_s)
        self.observed += (drafted or asked or 0) > 0  # a draft the threshold cut to nothing counts: it was tried
        for j in range(min(drafted, self.cap)):
            if j > accepted:
                break  # never reached: an earlier token was rejected
            self.reached[j] += 1
            self.accepted[j] += j < accepted
        for j, c in enumerate(confidences[: accepted + 1]):
            b = min(int(c * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)
            self.bin_offered[b] += 1
            self.bin_accepted[b] += j < accepted
        if drafted > ready:
            self.step_s = _ema(self.step_s, draft_s / (drafted - ready))
        if chained:
            self.chained_lookahead = True
            return
        self.rtt_s = _ema(self.rtt_s, max(latency_s - server_s, 0.0))
        if target_tokens == 0 or self.server_base_s is None:
            self.server_base_s = _ema(self.server_base_s, server_s)
        else:
            per = max(server_s - self.server_base_s, 0.0) / target_tokens
            self.server_per_token_s = (1 - EMA) * self.server_per_token_s + EMA * per

    def threshold(self) -> float:
        """The lowest confidence worth drafting at: from the bottom, the upper edge of the last
        bin (of those with evidence) whose acceptance is below ``min_acceptance``; 0 until one is."""
        edge = 0.0
        for b in range(CONFIDENCE_BINS):
            if self.bin_offered[b] < MIN_EVIDENCE:
                continue
            if (self.bin_accepted[b] + PRIOR_ACCEPTANCE) / (self.bin_offered[b] + 1.0) >= self.min_acceptance:
                break
            edge = (b + 1) / CONFIDENCE_BINS
        return edge

    # --- deciding ---------------------------------------------------------------------------------
    def reaches(self) -> list[float]:
        """Entry k: the chance that the first k draft positions are all accepted, for k up to one
        past the cap (the look-ahead's bonus token)."""
        out = [1.0]
        acceptances = self.acceptances()
        for a in acceptances + acceptances[-1:]:
            out.append(out[-1] * a)
        return out

    def expected_tokens(self, k: int, reaches: list[float] | None = None) -> float:
        return sum((reaches or self.reaches())[: k + 1])

    def server_s(self, k: int) -> float:
        """The verifier's time for a round with a k-token draft."""
        return (self.server_base_s or 0.0) + self.server_per_token_s * k

    def round_s(self, k: int, free_steps: int = 0) -> float:
        """Wall time of a round with a k-token draft, ``free_steps`` of it drafted while the
        previous round was in flight."""
        return max(k - free_steps, 0) * (self.step_s or 0.0) + (self.rtt_s or 0.0) + self.server_s(k)

    def choose(self, hint: int, free_steps: int = 0) -> Decision:
        """The draft length (drafter tokens, at most ``hint`` and ``cap``) with the most expected
        committed tokens per second. Until ``WARMUP_ROUNDS`` drafts are measured (a round or two of
        evidence would swing the model), the warm-up decides instead: a first probe of
        ``PROBE_DRAFT`` tokens (a 10-token draft of a slow board costs several rounds without one,
        before anything says whether drafting pays), then twice the last warm-up length while the
        warm-up measures faster than rounds without a draft are predicted to be, the probe again
        while it does not; it ends early once ``MIN_SAMPLES`` rounds say it loses. Every
        ``EXPLORE_EVERY``-th round explores: twice the best length (so that longer drafts stay
        measured, at a bounded cost), or while rounds without a draft are faster, at least a probe,
        every ``EXPLORE_EVERY * PLAIN_BACKOFF``-th round and half as often after each exploration
        that confirms it (at most ``MAX_EXPLORE_EVERY`` rounds apart)."""
        limit = min(hint, self.cap)
        threshold = self.threshold()
        self.decisions += 1
        reaches = self.reaches()
        warming = self.step_s is None or self.rtt_s is None or (
            self.observed < WARMUP_ROUNDS and not (self.warmup.settled and self.warmup_loses(reaches)))
        plain_faster = self.plain_measures_faster()
        if not plain_faster:
            self.backoff = 1
        every = min(EXPLORE_EVERY * (PLAIN_BACKOFF * self.backoff if plain_faster else 1), MAX_EXPLORE_EVERY)
        self.since_explore += 1
        explore = self.since_explore >= every
        if explore:
            self.since_explore = 0
            self.backoff *= 2 if plain_faster else 1
        probe = min(limit, PROBE_DRAFT)
        best = max(range(limit + 1), key=lambda k: (self.rate(k, limit, reaches, free_steps), -k))
        self.forced = warming or (explore and not plain_faster)
        if self.forced:
            if not warming:
                k = min(limit, max(2 * best, probe))
            elif self.observed == 0 or self.warmup_loses(reaches):
                k = probe
            else:
                k = min(limit, 2 * max(self.warmup_k, PROBE_DRAFT))
            self.warmup_k = k
            return Decision(k, hint, self.expected_tokens(k), math.nan, threshold)
        if explore:  # plain measures faster: still a short draft now and then, to keep measuring it
            best = max(best, probe)
        drafted = self.drafting.rate
        close = best and drafted is not None and drafted < PLAIN_CHECK_GAIN * self.rate(0, limit, reaches)
        if close and not explore and (self.decisions % PLAIN_EVERY == PLAIN_EVERY // 2 or plain_faster):
            best = 0  # a round without a draft: measured now and then, and taken while it is faster
        return Decision(best, hint, self.expected_tokens(best, reaches), self.round_s(best, free_steps), threshold)

    def warmup_loses(self, reaches: list[float]) -> bool:
        """Whether rounds that drafted the hint measured fewer committed tokens per second than the
        model predicts for rounds without a draft: a slow drafter next to a fast verifier, where
        warming up on the hint's long drafts would cost more than it teaches."""
        drafted = self.warmup.rate
        return drafted is not None and drafted < self.rate(0, 0, reaches)

    def plain_measures_faster(self) -> bool:
        """Whether rounds without a draft have committed more tokens per second than rounds with
        (of the controller's length, or before there are ``MIN_SAMPLES`` of them, of the hint's),
        measured over enough rounds of drafting to say so."""
        drafted = self.drafting if self.drafting.settled else self.warmup
        plain = self.plain.rate
        return plain is not None and drafted.settled and plain > (drafted.rate or 0.0)

    def rate(self, k: int, limit: int, reaches: list[float], free_steps: int = 0) -> float:
        """Expected committed tokens per second of drafting ``k`` tokens now (see the module's
        docstring for the look-ahead chain)."""
        tokens, seconds = self.expected_tokens(k, reaches), self.round_s(k, free_steps)
        if self.lookahead and k and self.step_s:
            if self.chained_lookahead:  # its answer follows the previous one, no sooner than the verifier allows
                ahead = min(chained_draft(k), limit - 1)
                ahead_s = max((ahead + 1) * self.step_s, self.server_s(ahead))
            else:
                in_flight = self.round_s(k, k)  # round trip and verifier: what the look-ahead has
                ahead = min(limit, int(in_flight / self.step_s)) - 1  # its first token is the bonus's
                ahead_s = self.round_s(ahead, ahead)
            if ahead > 0:
                p, q = reaches[k + 1], reaches[ahead + 1]
                r = p / max(1.0 - q, 1e-3)
                tokens += r * self.expected_tokens(ahead, reaches)
                seconds += r * ahead_s
        return tokens / max(seconds, 1e-9)
