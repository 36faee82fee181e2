"""The agent's generation loop: draft, send bytes, take the committed span, repeat."""
from __future__ import annotations

import functools
import operator
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Literal

import numpy as np

from edge_agent.client import VerifierClient, VerifierError
from edge_agent.controller import DraftController, chained_draft
from edge_agent.tli import TliProposer, tli_map
from shared.alignment import accepted_pieces
from shared.protocol import ChatMessage, FinishReason, SamplingOptions, SessionCreate, SessionCreated, VerifyResponse
from shared.sampling import Sampling
from shared.utf8 import complete_prefix_len

if TYPE_CHECKING:
    from edge_agent.drafter import Drafter
    from edge_agent.drafting import Draft, DraftSource

# How a sampled session drafts: token-level intersection (samples from q', sent along) or plain
# drafts verified by SLEM-sampling; auto picks TLI where the drafter's tokens are the target's
# (measured: only there does it accept more, see edge_agent.tli.shares_vocabulary).
SamplingMode = Literal["auto", "slem", "tli"]

# The longest draft a device offers; the verifier's hint shortens it to what pays on its hardware.
# 10 measured best under the modeled memory-bound GPU verifier (README, "Draft length").
DEFAULT_DRAFT_TOKENS = 10


@dataclass
class GenerationResult:
    text: bytes = b""
    ids: list[int] = field(default_factory=list)  # committed target ids: opaque, kept for recovery
    rounds: int = 0
    draft_tokens: int = 0  # drafter tokens sent
    accepted_draft_tokens: int = 0  # drafter tokens whose bytes the verifier committed
    elapsed_s: float = 0.0
    finish_reason: FinishReason | None = None
    round_latencies_s: list[float] = field(default_factory=list)
    resumed: int = 0  # times the session was re-created from its ids
    failovers: int = 0  # times the agent moved to another verifier replica
    prompt_tokens: int = 0  # the prompt's length in target tokens
    local_fallback: bool = False  # answered by the drafter alone: no verifier was reachable
    seed: int | None = None  # the sampling seed in use (None: greedy)
    # TLI: per drafted position, the drafter's probability mass inside the intersection
    tli_mass_inside: list[float] = field(default_factory=list)
    ahead_drafted: int = 0  # pipelined drafting: tokens drafted while rounds were in flight
    ahead_used: int = 0  # of those, tokens that opened the next round's draft
    ahead_rounds: int = 0  # rounds whose draft opened with such tokens
    chained_rounds: int = 0  # rounds sent before the previous answer (see VerifyRequest.chained), answered
    stale_rounds: int = 0  # chained rounds whose bet lost: sent, nothing committed
    sources: dict[str, int] = field(default_factory=dict)  # rounds opened by each draft source
    decisions: list[dict] = field(default_factory=list)  # the draft controller's, round by round

    @property
    def committed_tokens(self) -> int:
        return len(self.ids)

    def summary(self) -> dict:
        rounds = max(self.rounds, 1)
        return {
            "text": self.text.decode(errors="replace"),
            "rounds": self.rounds,
            "committed_tokens": self.committed_tokens,
            "draft_tokens": self.draft_tokens,
            "accepted_draft_tokens": self.accepted_draft_tokens,
            "draft_acceptance": round(self.accepted_draft_tokens / max(self.draft_tokens, 1), 4),
            "tokens_per_round": round(self.committed_tokens / rounds, 3),
            "elapsed_s": round(self.elapsed_s, 3),
            "tokens_per_s": round(self.committed_tokens / max(self.elapsed_s, 1e-9), 2),
            "finish_reason": self.finish_reason,
            "resumed": self.resumed,
            "failovers": self.failovers,
            "local_fallback": self.local_fallback,
            "seed": self.seed,
            "tli_coverage": round(sum(self.tli_mass_inside) / len(self.tli_mass_inside), 4)
            if self.tli_mass_inside else None,
            "lookahead": {"drafted": self.ahead_drafted, "used": self.ahead_used, "rounds": self.ahead_rounds,
                          "chained": self.chained_rounds, "stale": self.stale_rounds},
            "sources": self.sources,
        }


class DraftLength:
    """Turns the verifier's hint, counted in *target* tokens, into a number of *drafter* tokens.

    The two vocabularies cut text differently (SmolLM2 needs more tokens than Qwen for the same
    code, Gemma fewer), so the agent measures how many target tokens its drafts re-tokenize into
    (each answer's ``draft_tokens``) per drafter token it sent, and scales the hint by that.
    """

    PRIOR = 4.0  # drafter tokens of prior evidence for a ratio of 1

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.drafter_sent = 0
        self.target_seen = 0

    def observe(self, drafter_tokens: int, target_tokens: int) -> None:
        if drafter_tokens and target_tokens:
            self.drafter_sent += drafter_tokens
            self.target_seen += target_tokens

    def for_hint(self, hint: int) -> int:
        """Drafter tokens whose text should come to about ``hint`` target tokens."""
        if hint <= 0:
            return 0
        per_drafter = (self.target_seen + self.PRIOR) / (self.drafter_sent + self.PRIOR)
        return min(self.cap, max(1, round(hint / per_drafter)))


class GenerationCancelled(Exception):
    """The caller cancelled the generation (``Agent.generate``'s ``cancel`` was set): it stopped
    before its next round and its verifier session was deleted."""


def _replica_lost(e: VerifierError) -> bool:
    """Whether an error means the replica is gone or failing (rather than refusing the request):
    unreachable, or a 5xx after the client's retries."""
    return e.status == 0 or e.status >= 500


# A round refused with these leaves a replica that works but cannot go on with the session as the
# device holds it: 404, it no longer knows the session (expired, drained, restarted); 409, it
# cannot answer the round (a retry of a round answered before the chained rounds behind it, on a
# verifier that replays only its last answer). Either way the session is rebuilt from the ids the
# device holds, on the same replica.
RESUME_STATUSES = frozenset({404, 409})


@dataclass
class _Chained:
    """A round sent while rounds before it were in flight, betting that their answers commit a
    prefix of its text (see ``VerifyRequest.chained``)."""

    rest: bytes  # its text past the answers applied so far: its draft, once they all are
    tokens: int  # look-ahead tokens it took: its bet (the bonus token's guess) and its draft
    future: Future[VerifyResponse]
    sent_at: float

    def follows(self, answer: VerifyResponse) -> bool:
        """Take the answer to a round before it: whether its bet still holds. The verifier checks
        the same bytes, so a round whose bet lost is left to its stale answer: it commits nothing,
        whenever it arrives."""
        if answer.finished or not self.rest.startswith(answer.text):
            return False
        self.rest = self.rest[len(answer.text) :]
        return True


# Pipelined: rounds a device keeps in flight at most, the one awaited and the chained ones behind
# it. The protocol allows up to 4; 3 measured no faster than 2 (GPU-timed, 80 ms) and doubled the
# stale rounds the verifier answers.
ROUNDS_IN_FLIGHT = 2


@functools.cache
def _rounds_in_flight() -> ThreadPoolExecutor:
    """The threads that carry pipelined rounds while their agents draft on: one pool per process,
    shared by every agent in it (the daemon runs several), with room for a few rounds in flight
    (chained ones, stale ones not waited for) per agent."""
    return ThreadPoolExecutor(max_workers=64, thread_name_prefix="sled-round")


def as_source(drafter: Drafter | DraftSource | None) -> DraftSource | None:
    """A GGUF drafter is drafted through ``ModelSource``; other sources are taken as they are."""
    from edge_agent.drafter import Drafter
    from edge_agent.drafting import ModelSource

    return ModelSource(drafter) if isinstance(drafter, Drafter) else drafter


class Agent:
    """Generates through the verifier. ``adaptive`` sizes each draft with a ``DraftController``
    (learned per device, so kept across generations: pass ``controller`` to keep one across
    agents); ``pipelined`` drafts ahead while a round is in flight (GGUF drafters, plain drafts),
    and where the verifier takes chained rounds, sends what it drafted ahead as the next round
    before the answer is back: two rounds in flight."""

    def __init__(
        self,
        client: VerifierClient,
        drafter: Drafter | DraftSource | None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        follow_hint: bool = True,
        sampling_mode: SamplingMode = "auto",
        deadline_s: float = 30.0,
        adaptive: bool = False,
        pipelined: bool = False,
        controller: DraftController | None = None,
    ) -> None:
        from edge_agent.drafting import ModelSource

        self.client = client
        self.source = as_source(drafter)
        self.model = self.source if isinstance(self.source, ModelSource) else None  # TLI, look-ahead
        self.draft_tokens = draft_tokens if drafter is not None else 0
        self.follow_hint = follow_hint
        self.sampling_mode = sampling_mode
        self.deadline_s = deadline_s  # no replica answers for this long: the generation fails
        self.pipelined = pipelined and self.model is not None
        self.controller = (controller or DraftController(self.draft_tokens, lookahead=self.pipelined)
                           if adaptive and self.draft_tokens else None)

    def _tli_mapping(self, request: SessionCreate) -> np.ndarray | None:
        """The drafter -> target id map when this session drafts with TLI: a sampled session, and
        ``tli``, or ``auto`` where the drafter's tokens are the target's (where TLI wins), on a
        replica that verifies TLI rounds (else SLEM)."""
        if self.model is None or request.temperature == 0 or self.sampling_mode == "slem" or not self._serves_tli():
            return None
        mapping = tli_map(self.model.drafter, self.client)
        return mapping.ids if self.sampling_mode == "tli" or mapping.shares_vocabulary else None

    def _open(self, request: SessionCreate, result: GenerationResult) -> SessionCreated:
        """Create the session on the current replica, failing over until one answers or
        ``deadline_s`` has passed without any (then the last error, as a 503)."""
        deadline = time.monotonic() + self.deadline_s
        while True:
            try:
                return self.client.create_session(request)
            except VerifierError as e:
                if not _replica_lost(e):
                    raise
                if time.monotonic() > deadline:
                    raise VerifierError(f"no verifier answered for {self.deadline_s:.0f} s: {e}", 503,
                                        "unavailable") from None
                self.client.failover()
                result.failovers += 1

    def _draft(self, k: int, tli: TliProposer | None, stop: Callable[[float], bool] | None
               ) -> tuple[Draft, TliProposer | None]:
        """The next draft; a TLI draft that ends at its first position (nothing the drafter wants
        is a target token) falls back to a plain draft for this round."""
        from edge_agent.drafting import Draft

        if self.source is None or k <= 0:
            return Draft([]), None
        if tli is not None and self.model is not None:
            ids = self.model.drafter.draft(k, tli)
            if ids:
                return Draft([self.model.drafter.tokenizer.piece(t) for t in ids], source="gguf"), tli
        return self.source.propose(k, stop), None

    def _serves_tli(self) -> bool:
        """Whether the current replica verifies TLI rounds (one whose engine serves only top-K rows
        does not): where it does not, sampled sessions draft plainly (SLEM)."""
        try:
            return "sample-tli" in self.client.capabilities()
        except VerifierError:
            return False

    def _can_chain(self) -> bool:
        try:
            return "chained-rounds" in self.client.capabilities()
        except VerifierError:
            return False

    def _verify(self, session: str, round_no: int, draft: Draft, tli: TliProposer | None, result: GenerationResult,
                cap: int, chains: deque[_Chained], future: Future[VerifyResponse] | None = None) -> VerifyResponse:
        """The answer to the round (sent now, or already in flight as ``future``). Pipelined, the
        drafter drafts on while it is in flight, and each time it has a bet (the bonus token's
        guess) and a draft of up to ``cap`` tokens (the hint's) past the rounds in flight, sends
        them as one more chained round (added to ``chains``), up to ``ROUNDS_IN_FLIGHT`` rounds.
        A round without a draft, or a chained draft that the committed text cut inside a drafter
        token (no token view to draft on from), is only awaited."""
        model = self.model
        looks_ahead = self.pipelined and model is not None and tli is None and bool(model.sent)
        if future is None:
            args = (session, round_no, draft.text, tli.target_ids if tli else None, tli.proposals if tli else None)
            if not looks_ahead:
                return self.client.verify(*args)
            future = _rounds_in_flight().submit(self.client.verify, *args)
        if not looks_ahead or model is None:
            return future.result()
        size = min(chained_draft(len(draft.pieces)), cap, self.draft_tokens - 1) if self._can_chain() else 0
        bet = size + 1 if size > 0 else 0  # the bonus token's guess, then the chained draft

        def in_flight() -> bool:
            if future.done():
                return False
            taken = sum(c.tokens for c in chains)
            if bet and len(model.ahead) >= taken + bet:
                if len(chains) + 1 >= ROUNDS_IN_FLIGHT:
                    # The next chained round is ready to go when the answer comes: stop, so that
                    # the drafter is not busy with a token then.
                    return False
                text = draft.text + model.ahead_text(taken + bet)
                chained = len(chains) + 1  # the rounds in flight before it
                chains.append(_Chained(text, bet, _rounds_in_flight().submit(
                    self.client.verify, session, round_no + chained, text, chained=chained), time.perf_counter()))
            return True

        limit = ROUNDS_IN_FLIGHT * self.draft_tokens if bet else self.draft_tokens
        result.ahead_drafted += model.look_ahead(in_flight, limit)
        return future.result()

    def _chained_draft(self, chain: _Chained) -> Draft:
        """The draft of a chained round whose bet held: what it sent past the committed text."""
        from edge_agent.drafting import Draft

        assert self.model is not None  # only a model's look-ahead chains
        return self.model.take_sent(chain.rest) or Draft([chain.rest] if chain.rest else [], source=self.model.name)

    def generate(
        self,
        prompt: str | None = None,
        messages: list[ChatMessage] | None = None,
        max_tokens: int = 128,
        stop: list[str] | None = None,
        on_text: Callable[[bytes], None] | None = None,
        sampling: SamplingOptions | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Generate one completion. ``sampling`` defaults to greedy decoding; a sampled session
        without a seed gets one from the server (``GenerationResult.seed``), and a session rebuilt
        on another replica keeps it, so its output continues exactly.

        ``cancel`` (set from another thread, e.g. when the daemon's client disconnects) stops the
        generation before its next round with ``GenerationCancelled``; the verifier session is
        deleted either way, so an abandoned generation stops using the verifier at once."""
        request = SessionCreate(prompt=prompt, messages=messages, max_tokens=max_tokens, stop=stop or [],
                                idempotency_key=uuid.uuid4().hex,
                                **(sampling or SamplingOptions()).model_dump())
        result = GenerationResult()
        length = DraftLength(self.draft_tokens)
        t0 = time.perf_counter()
        created = self._open(request, result)
        session, hint, round_no = created.session_id, created.draft_hint, 1
        result.seed = created.seed
        result.prompt_tokens = created.prompt_tokens
        if created.seed is not None:
            request = request.model_copy(update={"seed": created.seed})
        if self.source is not None:
            self.source.start(prompt, messages)
        tli_mapping = self._tli_mapping(request)
        chains: deque[_Chained] = deque()  # rounds in flight behind the one awaited, whose bets hold
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled(f"generation cancelled after {result.rounds} rounds")
                t_start = time.perf_counter()
                future: Future[VerifyResponse] | None = None
                tli: TliProposer | None = None
                cap = length.for_hint(hint) if self.follow_hint else self.draft_tokens
                asked = 0  # drafter tokens the controller asked for (a draft may stop short of them)
                if chains:
                    chain = chains.popleft()
                    draft, draft_s = self._chained_draft(chain), 0.0
                    future, t_round = chain.future, chain.sent_at
                    asked = len(draft.pieces)
                else:
                    k = cap
                    proposer = None
                    if tli_mapping is not None and self._serves_tli():  # asked once per replica
                        rng = np.random.default_rng([created.seed or 0, len(result.ids)])
                        proposer = TliProposer(tli_mapping, Sampling.of(request), rng)
                    stop_at: Callable[[float], bool] | None = None
                    if self.controller is not None and proposer is None:
                        decision = self.controller.choose(k, free_steps=self._carried())
                        result.decisions.append(decision.as_dict())
                        k = decision.k
                        stop_at = partial(operator.gt, decision.threshold)  # below the threshold: stop
                    t_draft = time.perf_counter()
                    draft, tli = self._draft(k, proposer, stop_at)
                    draft_s = time.perf_counter() - t_draft
                    asked = k
                    if proposer is not None:
                        result.tli_mass_inside += proposer.mass_inside
                    t_round = time.perf_counter()
                try:
                    resp = self._verify(session, round_no, draft, tli, result, cap, chains, future)
                except VerifierError as e:
                    chains.clear()  # a resumed session numbers its rounds afresh
                    if _replica_lost(e):  # another replica takes over
                        self.client.failover(left_behind=session)
                        result.failovers += 1
                    elif e.status in RESUME_STATUSES:
                        # The replica works: free what the session holds there (it may have
                        # committed rounds whose answers never arrived here).
                        self.client.delete_session(session)
                    else:
                        raise
                    # Rebuild the session from the ids applied here (rounds committed there whose
                    # answers were lost in flight are dropped with it): output continues exactly.
                    resumed = request.model_copy(
                        update={"resume_ids": list(result.ids), "idempotency_key": uuid.uuid4().hex})
                    session, round_no = self._open(resumed, result).session_id, 1
                    result.resumed += 1
                    continue
                if resp.stale:  # a chained round that overtook the round it bet on: send it again
                    # The rounds behind it bet on it too: wait for their stale answers, so that none
                    # can meet the round sent again.
                    result.stale_rounds += 1 + len(chains)
                    while chains:
                        chains.popleft().future.exception()
                    if self.source is not None:  # nothing committed: its look-ahead state goes
                        self.source.commit(b"")
                    continue
                latency = time.perf_counter() - t_round
                result.round_latencies_s.append(latency)
                result.rounds += 1
                result.chained_rounds += future is not None
                accepted = accepted_pieces(draft.pieces, resp.accepted_bytes)
                # The generation's first draft pays the prompt's prefill: a one-off the controller
                # leaves out. A later catch-up (text committed by rounds without a draft) is the
                # price of switching to drafting, and counts.
                first_draft = result.draft_tokens == 0
                self._account(result, draft, accepted)
                length.observe(len(draft.pieces), resp.draft_tokens)
                result.ids += resp.ids
                result.text += resp.text
                if resp.text and on_text is not None:
                    on_text(resp.text)
                if self.source is not None:
                    self.source.commit(resp.text)
                if self.controller is not None and tli is None:
                    self.controller.observe(len(draft.pieces), accepted, draft.confidences, draft_s, latency,
                                            resp.server_s, resp.draft_tokens, draft.ready, len(resp.ids),
                                            time.perf_counter() - t_start, chained=future is not None,
                                            prefill_s=draft.prefill_s if first_draft else 0.0, asked=asked)
                hint, round_no = resp.draft_hint, round_no + 1
                held = [c for c in chains if c.follows(resp)]
                result.stale_rounds += len(chains) - len(held)  # their bets lost
                chains = deque(held)
                if resp.finished:
                    result.finish_reason = resp.finish_reason
                    break
        finally:
            self.client.delete_session(session)
            self.client.delete_left_behind()
        result.elapsed_s = time.perf_counter() - t0
        return result

    def _carried(self) -> int:
        """Tokens of the next draft already drafted during the last round (pipelining)."""
        return len(self.model.carried) if self.model is not None else 0

    def _account(self, result: GenerationResult, draft: Draft, accepted: int) -> None:
        result.draft_tokens += len(draft.pieces)
        result.accepted_draft_tokens += accepted
        if not draft.pieces:
            return
        result.sources[draft.source] = result.sources.get(draft.source, 0) + 1
        if draft.ready:
            result.ahead_rounds += 1
            result.ahead_used += draft.ready
        if self.source is not None:
            self.source.feedback(draft, accepted)


def local_generate(drafter: Drafter, prompt: str | None, messages: list[ChatMessage] | None, max_tokens: int,
                   stop: list[str] | None = None) -> GenerationResult:
    """The drafter alone, greedy: the opt-in answer when no verifier is reachable. Not the target's
    output, so the result says so (``local_fallback``) and callers must show it."""
    t0 = time.perf_counter()
    drafter.start(prompt, messages)
    ids = drafter.draft(max_tokens)
    text = b"".join(drafter.tokenizer.piece(t) for t in ids)
    cuts = [i for s in stop or [] if (i := text.find(s.encode())) >= 0]
    finish: FinishReason = "stop" if cuts else ("length" if len(ids) >= max_tokens else "eos")
    text = text[: min(cuts)] if cuts else text
    text = text[: complete_prefix_len(text)]
    return GenerationResult(text=text, ids=[], finish_reason=finish, local_fallback=True,
                            elapsed_s=time.perf_counter() - t0)
