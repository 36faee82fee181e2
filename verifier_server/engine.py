"""The verifier's core: sessions, numbered rounds, bytes <-> target ids, stop strings and UTF-8
hold-back, and the draft-length hint. Independent of HTTP and of the model runtime: forward work
goes to a ``Runner``, which verifies whole rounds.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from shared.alignment import continuation_ids
from shared.chat import ChatTemplateError
from shared.protocol import (
    PROTOCOL_VERSION,
    Limits,
    ServerInfo,
    SessionCreate,
    SessionCreated,
    VerifyRequest,
    VerifyResponse,
    Vocabulary,
)
from shared.sampling import Sampling
from shared.utf8 import common_prefix_len, complete_prefix_len
from verifier_server.acceptance import GREEDY, AcceptanceRule, Greedy, RowKind, SlemSample, TliSample
from verifier_server.auth import ANONYMOUS
from verifier_server.draft_hint import recommend
from verifier_server.quantiles import DurationHistogram
from verifier_server.runner import Runner, TargetTokenizer
from verifier_server.session import Session
from verifier_server.stops import StopMatcher


def _vocabulary(tok: TargetTokenizer) -> Vocabulary:
    """The target's pieces and their content hash (what an agent caches its TLI map by)."""
    pieces = [tok.piece(t) for t in range(tok.n_vocab)]
    digest = hashlib.sha256()
    for p in pieces:
        digest.update(len(p).to_bytes(2, "little") + p)
    return Vocabulary(hash=digest.hexdigest()[:32], pieces=pieces)


# The acceptance rules a session can ask for, by the capability /v1/info names them with.
RULES: dict[str, type[Greedy] | type[SlemSample] | type[TliSample]] = {
    Greedy.name: Greedy, SlemSample.name: SlemSample, TliSample.name: TliSample,
}
_ROW_KINDS = {RowKind.TOP: "top-K rows", RowKind.FULL: "full-vocabulary rows"}


def serves(row_kinds: frozenset[RowKind], needs: RowKind) -> bool:
    """Whether a runner serving ``row_kinds`` in every round can run a rule that ``needs`` this kind
    (full rows settle every rule)."""
    return needs in row_kinds or RowKind.FULL in row_kinds


class EngineError(Exception):
    """A request the engine refuses; ``status`` is the HTTP status that fits, ``retry_after`` the
    seconds worth waiting before trying again (when trying again can help)."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class NotFound(EngineError):
    status, code = 404, "not_found"


class Conflict(EngineError):
    status, code = 409, "conflict"


class TooLarge(EngineError):
    status, code = 413, "too_large"


class Busy(EngineError):
    status, code = 503, "busy"


class Draining(EngineError):
    status, code = 503, "draining"


class LimitExceeded(EngineError):
    status, code = 429, "rate_limited"


@dataclass(frozen=True)
class RoundRecord:
    """One verify round as the engine saw it (for metrics)."""

    device: str
    draft_tokens: int  # candidates, in target tokens
    accepted_tokens: int
    committed_tokens: int
    seconds: float  # in the engine, the wait for a pass included
    replayed: bool = False  # a retry answered from the last response
    stale: bool = False  # a chained round whose bet lost

    @property
    def outcome(self) -> str:
        if self.replayed:
            return "replayed"
        if self.stale:
            return "stale"
        if self.draft_tokens == 0:
            return "no_draft"
        if self.accepted_tokens == self.draft_tokens:
            return "accepted_all"
        return "accepted_some" if self.accepted_tokens else "rejected_all"


@dataclass
class EngineConfig:
    max_draft_bytes: int = 4096
    max_draft_tokens: int = 16
    max_sessions: int = 64
    session_ttl_s: float = 600.0
    device_sessions: int | None = None  # sessions one device may hold at once (None: no limit)


class Engine:
    def __init__(self, runner: Runner, config: EngineConfig | None = None, session_prefix: str = "") -> None:
        self.runner = runner
        self.config = config or EngineConfig()
        self.sessions: dict[str, Session] = {}
        # Places taken by creations still tokenizing their prompt, per device: counted against the
        # caps as sessions are, so that a burst of concurrent creates cannot pass them all.
        self._reserved: Counter[str] = Counter()
        # (device, idempotency key) -> the request and its creation task (in progress or done)
        self._created: dict[tuple[str, str], tuple[SessionCreate, asyncio.Future[SessionCreated]]] = {}
        self.session_prefix = session_prefix  # routes a session id to this replica (a load balancer's map)
        self.draining = False
        self.round_listeners: list[Callable[[RoundRecord], None]] = []
        self.committed_tokens = 0
        self.rounds = 0
        # Per round: seconds in the engine and runner outside the model and the wait for a pass.
        self.round_overhead = DurationHistogram()
        self.round_rule = DurationHistogram()  # the acceptance rule's share
        self.vocabulary = _vocabulary(runner.tokenizer)

    # --- info ---------------------------------------------------------------------------------
    def info(self) -> ServerInfo:
        tok = self.runner.tokenizer
        return ServerInfo(
            protocol_version=PROTOCOL_VERSION,
            vocab_hash=self.vocabulary.hash,
            model=self.runner.model_name,
            backend=self.runner.name,
            n_vocab=tok.n_vocab,
            tokenizer=tok.kind,
            chat_template=tok.chat_template is not None,
            capabilities=[name for name, rule in RULES.items() if serves(self.runner.row_kinds, rule.needs)]
            + ["chat", "stop", "resume", "draft-hint", "idempotent-create", "chained-rounds"],
            limits=Limits(
                max_draft_bytes=self.config.max_draft_bytes,
                max_draft_tokens=self.config.max_draft_tokens,
                max_context_tokens=self.runner.max_context_tokens,
                max_sessions=self.config.max_sessions,
                sequence_slots=self.runner.sequence_slots,
                max_parked_bytes=self.runner.max_parked_bytes,
            ),
        )

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring and the benchmark: the engine's, then the runner's."""
        return {
            "sessions": len(self.sessions),
            "draining": self.draining,
            "rounds": self.rounds,
            "committed_tokens": self.committed_tokens,
            "round_overhead_ms": self.round_overhead.summary_ms(),
            "acceptance_rule_ms": self.round_rule.summary_ms(),
            **self.runner.stats(),
        }

    # --- sessions -----------------------------------------------------------------------------
    async def create(self, req: SessionCreate, device: str = ANONYMOUS) -> SessionCreated:
        """Open a session owned by ``device``. With an idempotency key the creation runs once, as
        its own task: a repeat by the same device (a retry after a read timeout, even while the
        first is still prefilling) gets the same answer, and a first caller that goes away does not
        abort it. Keys are per device: another device's key never reaches its session."""
        if req.idempotency_key is None:
            return await self._create(req, device)
        key = (device, req.idempotency_key)
        if key in self._created:
            first, task = self._created[key]
            if first != req:
                raise Conflict(f"idempotency key '{req.idempotency_key}' was used for a different session request")
        else:
            task = asyncio.ensure_future(self._create(req, device))
            self._created[key] = (req, task)
            task.add_done_callback(partial(self._creation_done, key))
        return await asyncio.shield(task)

    def _creation_done(self, key: tuple[str, str], task: asyncio.Future[SessionCreated]) -> None:
        """A failed creation created nothing: forget its key so that a retry tries again."""
        if task.cancelled() or task.exception() is not None:
            self._created.pop(key, None)

    async def _create(self, req: SessionCreate, device: str) -> SessionCreated:
        if self.draining:
            raise Draining("this replica is draining before a restart: open the session on another",
                           retry_after=1.0)
        with self._place(device):
            s, created = await self._open(req, device)
        async with s.lock:
            try:
                await self.runner.prefill(s.id, s.ids)
            except BaseException:
                self._forget(s)
                raise
            s.touch()  # idle from now: a prefill queued behind a loaded server is not idleness
        return created

    @contextlib.contextmanager
    def _place(self, device: str) -> Iterator[None]:
        """Reserve a place for a session of ``device`` under both caps, or refuse; the place is
        released when the block ends (by then the session is in ``sessions``, or it failed)."""
        self.expire_idle()
        if len(self.sessions) + self._reserved.total() >= self.config.max_sessions:
            raise Busy(f"the server holds its maximum of {self.config.max_sessions} sessions", retry_after=1.0)
        limit = self.config.device_sessions
        held = sum(1 for x in self.sessions.values() if x.owner == device) + self._reserved[device]
        if limit is not None and held >= limit:
            raise LimitExceeded(f"device '{device}' holds its maximum of {limit} sessions; finish or delete one",
                                retry_after=1.0)
        self._reserved[device] += 1
        try:
            yield
        finally:
            self._reserved[device] -= 1
            if not self._reserved[device]:
                del self._reserved[device]

    async def _open(self, req: SessionCreate, device: str) -> tuple[Session, SessionCreated]:
        """The session for ``req``, in ``sessions`` with its prompt tokenized (not yet prefilled)."""
        tok = self.runner.tokenizer
        try:  # template rendering and tokenization scale with the prompt: off the event loop
            prompt = await asyncio.to_thread(tok.prompt_ids, req.prompt, req.messages)
        except ChatTemplateError as e:
            raise EngineError(str(e)) from None
        if not prompt:
            raise EngineError("the prompt is empty")
        bad = [t for t in req.resume_ids if not 0 <= t < tok.n_vocab]
        if bad:
            raise EngineError(f"resume_ids holds ids outside the vocabulary (0..{tok.n_vocab - 1}): {bad[:5]}")
        need = len(prompt) + req.max_tokens + self.config.max_draft_tokens
        if need > self.runner.max_context_tokens:
            raise TooLarge(
                f"prompt ({len(prompt)} tokens) + max_tokens ({req.max_tokens}) + draft "
                f"({self.config.max_draft_tokens}) exceed the context of {self.runner.max_context_tokens} tokens"
            )
        sampling = Sampling.of(req)
        self._check_rule(Greedy if sampling.greedy else SlemSample)
        s = Session(
            id=self.session_prefix + uuid.uuid4().hex,
            owner=device,
            prompt_len=len(prompt),
            ids=prompt,
            max_tokens=req.max_tokens,
            stops=StopMatcher([x.encode() for x in req.stop]),
            idempotency_key=req.idempotency_key,
            sampling=sampling,
            seed=req.seed if req.seed is not None else secrets.randbits(63),
        )
        self._commit(s, req.resume_ids)
        s.sent = s.sendable_end()
        self.sessions[s.id] = s
        return s, SessionCreated(
            session_id=s.id,
            prompt_tokens=len(prompt),
            max_tokens=req.max_tokens,
            draft_hint=self._hint(s),
            seed=None if sampling.greedy else s.seed,
        )

    async def delete(self, session_id: str, device: str = ANONYMOUS) -> None:
        s = self._get(session_id, device)
        async with s.lock:  # a round in flight finishes first
            self._forget(s)

    def drain(self) -> None:
        """Stop taking sessions: new ones are refused (503, Retry-After), idle ones are released
        now and busy ones when their round in flight has answered; their devices then get 404
        and resume on another replica from their ids."""
        self.draining = True
        for s in [s for s in self.sessions.values() if not s.lock.locked()]:
            self._forget(s)

    def rounds_in_flight(self) -> int:
        return sum(1 for s in self.sessions.values() if s.lock.locked())

    def expire_idle(self) -> None:
        """Free sessions unused for longer than the configured time-to-live."""
        cutoff = time.monotonic() - self.config.session_ttl_s
        for s in [s for s in self.sessions.values() if s.last_used < cutoff and not s.lock.locked()]:
            self._forget(s)

    def _forget(self, s: Session) -> None:
        if self.sessions.pop(s.id, None) is None:
            return
        if s.idempotency_key is not None:
            self._created.pop((s.owner, s.idempotency_key), None)
        self.runner.release(s.id)

    def _get(self, session_id: str, device: str) -> Session:
        """The session, if ``device`` owns it; another device's session is as unknown as a
        missing one (the same 404: no existence leak)."""
        s = self.sessions.get(session_id)
        if s is None or s.owner != device:
            raise NotFound(f"unknown session '{session_id}' (expired, deleted, or on another replica)")
        return s

    def _active_sessions(self, now: float, within_s: float = 2.0) -> int:
        """Sessions generating right now (a round within the last ``within_s``): the rounds the
        runner can expect to batch together."""
        return sum(1 for x in self.sessions.values() if not x.finished and now - x.last_used < within_s)

    # --- rounds -------------------------------------------------------------------------------
    async def verify(self, session_id: str, req: VerifyRequest, device: str = ANONYMOUS) -> VerifyResponse:
        s = self._get(session_id, device)
        try:
            async with s.lock:
                if self.sessions.get(session_id) is not s:  # deleted or expired while we waited
                    raise NotFound(f"session '{session_id}' was deleted")
                try:
                    return await self._round(s, req)
                finally:
                    # The time-to-live counts from the answer: a round that waited minutes for a
                    # pass on a loaded server must not leave its session expired on arrival.
                    s.touch()
        finally:
            if self.draining:  # its round has answered: the device resumes elsewhere
                self._forget(s)

    async def _round(self, s: Session, req: VerifyRequest) -> VerifyResponse:
        t0 = time.perf_counter()
        s.touch()
        self.runner.expect_rounds(self._active_sessions(s.last_used))
        if (answered := s.replay(req.round)) is not None:
            self._record(RoundRecord(s.owner, 0, 0, 0, 0.0, replayed=True))
            return answered  # a retry: same answer, nothing committed twice
        if len(req.draft) > self.config.max_draft_bytes:
            raise TooLarge(
                f"draft of {len(req.draft)} bytes exceeds the limit of {self.config.max_draft_bytes}"
            )
        device_draft = req.draft  # after the text the device holds
        if req.chained:
            bet = s.answered_text(req.chained) if req.round == s.round + 1 and not s.finished else None
            if bet is None or not device_draft.startswith(bet):
                self._record(RoundRecord(s.owner, 0, 0, 0, time.perf_counter() - t0, stale=True))
                return self._stale(s, req)
            device_draft = device_draft[len(bet) :]  # what the device drafted past the answers it bet on
        if req.round != s.round + 1:
            raise Conflict(f"round {req.round} is out of order: the next round is {s.round + 1}")
        if s.finished:  # finished at creation (a resumed session that had already ended)
            return self._respond(s, req, device_draft, [], 0, 0)
        draft = device_draft[: complete_prefix_len(device_draft)]
        # The device's text ends where the last answer did; bytes committed but held back
        # since (an incomplete character, a possible stop string) must open the draft.
        pending = bytes(s.text[s.sent :])
        draft = draft[len(pending) :] if draft.startswith(pending) else b""
        room = max(min(self.config.max_draft_tokens, s.max_tokens - s.generated - 1), 0)
        candidates: list[int] = []
        rule = self._rule(s)
        if req.draft_ids is not None:
            candidates, rule = self._tli_round(s, req, room, bool(pending))
        elif draft and room:
            ids = list(s.ids)  # a snapshot: the thread must not see the list change
            candidates = (await asyncio.to_thread(continuation_ids, self.runner.tokenizer, ids, draft))[:room]
        outcome = await self.runner.verify(s.id, s.ids, candidates, rule)
        s.history.observe(len(candidates), outcome.accepted)
        old = len(s.ids)
        self._commit(s, candidates[: outcome.accepted] + [outcome.token])
        self.committed_tokens += len(s.ids) - old
        resp = self._respond(s, req, device_draft, s.ids[old:], len(candidates), outcome.accepted)
        elapsed = time.perf_counter() - t0
        resp.server_s = round(elapsed, 6)
        self.round_overhead.record(elapsed - outcome.queue_s - outcome.model_s)
        self.round_rule.record(outcome.rule_s)
        self._record(RoundRecord(s.owner, len(candidates), outcome.accepted, len(resp.ids), elapsed))
        return resp

    def _record(self, rec: RoundRecord) -> None:
        for listener in self.round_listeners:
            listener(rec)

    def _check_rule(self, rule: type[Greedy] | type[SlemSample] | type[TliSample]) -> None:
        """Refuse (400) a rule this engine's runner cannot run, saying why."""
        kinds = self.runner.row_kinds
        if serves(kinds, rule.needs):
            return
        served = " and ".join(_ROW_KINDS[k] for k in RowKind if k in kinds) or "no rows"
        hint = ": use SLEM sampling or a verifier started with --full-rows" if rule.needs is RowKind.FULL else ""
        raise EngineError(f"this verifier's engine ({self.runner.name}) serves {served} only; rule "
                          f"'{rule.name}' needs {_ROW_KINDS[rule.needs]}{hint}")

    @staticmethod
    def _rule(s: Session) -> AcceptanceRule:
        """The round's acceptance rule: greedy, or seeded sampling from the round's position."""
        if s.sampling.greedy:
            return GREEDY
        return SlemSample(s.sampling, s.seed, len(s.ids))

    def _tli_round(self, s: Session, req: VerifyRequest, room: int, pending: bool) -> tuple[list[int], AcceptanceRule]:
        """The candidates and rule of a TLI round: the device's target ids and their q'. A draft
        that cannot continue the committed text (it began before bytes held back since) is
        dropped: the round then draws one token, as any round does."""
        assert req.draft_ids is not None and req.proposals is not None
        if s.sampling.greedy:
            raise EngineError("a TLI round needs a sampled session (temperature > 0)")
        self._check_rule(TliSample)
        tok = self.runner.tokenizer
        bad = [t for q in req.proposals for t in q.ids if not 0 <= t < tok.n_vocab]
        if bad:
            raise EngineError(f"proposals hold ids outside the vocabulary (0..{tok.n_vocab - 1}): {bad[:5]}")
        if b"".join(tok.piece(t) for t in req.draft_ids) != req.draft:
            raise EngineError("'draft' must be the bytes of 'draft_ids' in a TLI round")
        if pending:
            return [], self._rule(s)
        candidates = req.draft_ids[:room]
        return candidates, TliSample(s.sampling, s.seed, len(s.ids), tuple(req.proposals[: len(candidates)]))

    def _commit(self, s: Session, new_ids: list[int]) -> None:
        """Append target ids, stopping at end-of-generation, max_tokens or a stop string."""
        tok = self.runner.tokenizer
        for t in new_ids:
            if s.finished:
                break
            s.ids.append(t)
            if tok.is_eog(t):
                s.finish_reason = "eos"
                break
            piece = tok.piece(t)
            s.text += piece
            cut = s.stops.feed(piece)
            if cut is not None:
                del s.text[cut:]
                s.finish_reason = "stop"
            elif s.generated >= s.max_tokens:
                s.finish_reason = "length"

    def _hint(self, s: Session) -> int:
        if s.finished:
            return 0
        return recommend(s.history, self.runner.round_cost(), self.config.max_draft_tokens)

    def _stale(self, s: Session, req: VerifyRequest) -> VerifyResponse:
        """The answer to a chained round whose bet lost: nothing committed, nothing remembered."""
        return VerifyResponse(round=req.round, text=b"", ids=[], accepted_bytes=0, draft_tokens=0,
                              accepted_tokens=0, committed_tokens=s.generated, finished=s.finished,
                              finish_reason=s.finish_reason, draft_hint=self._hint(s), stale=True)

    def _respond(self, s: Session, req: VerifyRequest, draft: bytes, new_ids: list[int], n_cand: int,
                 n_acc: int) -> VerifyResponse:
        """The round's answer; ``draft`` is the draft as the round used it (a chained round's,
        past the answer it bet on), which ``accepted_bytes`` counts in."""
        end = s.sendable_end()
        resp = VerifyResponse(
            round=req.round,
            text=bytes(s.text[s.sent : end]),
            ids=new_ids,
            accepted_bytes=common_prefix_len(s.text[s.sent :], draft),
            draft_tokens=n_cand,
            accepted_tokens=n_acc,
            committed_tokens=s.generated,
            finished=s.finished,
            finish_reason=s.finish_reason,
            draft_hint=self._hint(s),
        )
        s.answer_starts.append(s.sent)
        s.sent = end
        s.round = req.round
        s.answers.append(resp)
        self.rounds += 1
        return resp

    def close(self) -> None:
        self.runner.close()
