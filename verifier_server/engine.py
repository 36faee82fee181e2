"""The verifier's core: sessions, rounds and the acceptance of drafts, independent of HTTP."""
from __future__ import annotations

import asyncio
import time
from functools import partial
from dataclasses import dataclass

from shared.alignment import continuation_ids
from shared.llama_text import ChatTemplateError
from shared.protocol import (
    PROTOCOL_VERSION,
    Limits,
    ServerInfo,
    SessionCreate,
    SessionCreated,
    VerifyRequest,
    VerifyResponse,
)
from shared.utf8 import common_prefix_len, complete_prefix_len
from verifier_server.acceptance import greedy_accept
from verifier_server.backend import Backend, ForwardItem
from verifier_server.draft_hint import CostCurve, DraftHint
from verifier_server.scheduler import Scheduler
from verifier_server.session import Session, SlotTable


class EngineError(Exception):
    """A request the engine refuses; ``status`` is the HTTP status that fits."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(EngineError):
    status, code = 404, "not_found"


class Conflict(EngineError):
    status, code = 409, "conflict"


class TooLarge(EngineError):
    status, code = 413, "too_large"


class Busy(EngineError):
    status, code = 503, "busy"


@dataclass
class EngineConfig:
    max_draft_bytes: int = 4096
    max_draft_tokens: int = 16
    max_sessions: int = 64
    session_ttl_s: float = 600.0
    token_budget: int = 512
    wait_window_s: float = 0.002
    max_parked_bytes: int = 1 << 30


def calibrate(backend: Backend, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> CostCurve:
    """Time one forward pass of each size on a scratch slot: the start-up cost curve of the
    draft-length hint, refined later by live passes. Logits are taken at every position, as a verify
    round needs them (the output layer is a large share of a small model's pass)."""
    tokens = backend.text.encode(b"def f(x):\n    return x * 2\n" * 16)[: max(sizes)]
    backend.forward([ForwardItem(0, 0, tokens[:1], 1)])  # warm-up
    points = {}
    for b in sizes:
        t0 = time.perf_counter()
        backend.forward([ForwardItem(0, 0, tokens[:b], b)])
        points[b] = time.perf_counter() - t0
    return CostCurve(points)


class Engine:
    def __init__(self, backend: Backend, config: EngineConfig | None = None) -> None:
        self.backend = backend
        self.config = config or EngineConfig()
        curve = calibrate(backend)
        self.scheduler = Scheduler(backend, self.config.token_budget, self.config.wait_window_s)
        self.slots = SlotTable(backend.n_slots, on_evict=self._park)
        self.parked_bytes = 0
        self.sessions: dict[str, Session] = {}
        self.hint = DraftHint(self.scheduler.stats, curve, self.config.max_draft_tokens)
        self.committed_tokens = 0
        self.rounds = 0

    # --- info ---------------------------------------------------------------------------------
    def info(self) -> ServerInfo:
        text = self.backend.text
        return ServerInfo(
            protocol_version=PROTOCOL_VERSION,
            model=self.backend.model_name,
            backend=self.backend.name,
            n_vocab=text.n_vocab,
            tokenizer=text.kind,
            chat_template=text.chat_template is not None,
            capabilities=["greedy", "chat", "stop", "resume", "draft-hint"],
            limits=Limits(
                max_draft_bytes=self.config.max_draft_bytes,
                max_draft_tokens=self.config.max_draft_tokens,
                max_context_tokens=self.backend.ctx_per_slot,
                max_sessions=self.config.max_sessions,
                sequence_slots=self.backend.n_slots,
                max_parked_bytes=self.config.max_parked_bytes,
            ),
        )

    def stats(self) -> dict:
        """Counters for monitoring and the benchmark."""
        st = self.scheduler.stats
        return {
            "sessions": len(self.sessions),
            "slots_in_use": self.slots.in_use,
            "parked_sessions": sum(1 for x in self.sessions.values() if x.parked is not None),
            "parked_bytes": self.parked_bytes,
            "rounds": self.rounds,
            "committed_tokens": self.committed_tokens,
            "forward_passes": st.forward_passes,
            "positions": st.positions,
            "busy_s": st.busy_s,
            "cost_curve_s": self.hint.curve.as_dict(),
            "batch_sizes": {str(b): c for b, c in sorted(st.batch_sizes.items())},
        }

    # --- sessions -----------------------------------------------------------------------------
    async def create(self, req: SessionCreate) -> SessionCreated:
        self.expire_idle()
        if len(self.sessions) >= self.config.max_sessions:
            raise Busy(f"the server holds its maximum of {self.config.max_sessions} sessions")
        text = self.backend.text
        try:
            prompt = text.prompt_ids(req.prompt, req.messages)
        except ChatTemplateError as e:
            raise EngineError(str(e)) from None
        if not prompt:
            raise EngineError("the prompt is empty")
        bad = [t for t in req.resume_ids if not 0 <= t < text.n_vocab]
        if bad:
            raise EngineError(f"resume_ids holds ids outside the vocabulary (0..{text.n_vocab - 1}): {bad[:5]}")
        need = len(prompt) + req.max_tokens + self.config.max_draft_tokens
        if need > self.backend.ctx_per_slot:
            raise TooLarge(
                f"prompt ({len(prompt)} tokens) + max_tokens ({req.max_tokens}) + draft "
                f"({self.config.max_draft_tokens}) exceed the context of {self.backend.ctx_per_slot} tokens"
            )
        s = Session(
            prompt_len=len(prompt),
            ids=prompt,
            max_tokens=req.max_tokens,
            stop=[x.encode() for x in req.stop],
        )
        self._commit(s, req.resume_ids)
        s.sent = s.sendable_end()
        self.sessions[s.id] = s
        async with s.lock:
            await self._prefill(s)
        return SessionCreated(
            session_id=s.id,
            prompt_tokens=len(prompt),
            max_tokens=req.max_tokens,
            max_draft_tokens=self.hint.limit(s),
        )

    async def delete(self, session_id: str) -> None:
        s = self._get(session_id)
        async with s.lock:  # never free a slot under a round in flight
            self._forget(s)

    def expire_idle(self) -> None:
        """Free sessions unused for longer than the configured time-to-live."""
        cutoff = time.monotonic() - self.config.session_ttl_s
        for s in [s for s in self.sessions.values() if s.last_used < cutoff and not s.lock.locked()]:
            self._forget(s)

    def _forget(self, s: Session) -> None:
        self.slots.release(s)
        self._unpark(s)
        self.sessions.pop(s.id, None)

    # --- parking ------------------------------------------------------------------------------
    def _park(self, s: Session, slot: int) -> None:
        """Save an evicted session's KV state to host memory; queued before the slot's new owner
        writes to it, so the copy is exact. Over the budget, the least recently used parked
        sessions are dropped instead (they are rebuilt from their ids when they return)."""
        if s.kv_len == 0 or s.finished:
            return
        s.parked, s.parked_len = self.scheduler.call(partial(self.backend.save_state, slot)), s.kv_len

        def saved(fut: asyncio.Future) -> None:
            if fut.cancelled() or fut.exception() is not None or s.parked is not fut:
                return
            s.parked_bytes = len(fut.result())
            self.parked_bytes += s.parked_bytes
            parked = sorted((x for x in self.sessions.values() if x.parked is not None and x.parked.done()),
                            key=lambda x: x.last_used)
            for old in parked:
                if self.parked_bytes <= self.config.max_parked_bytes:
                    break
                self._unpark(old)

        s.parked.add_done_callback(saved)

    def _unpark(self, s: Session) -> bytes | None:
        """Take a session's parked state out of host memory (None if it has none)."""
        fut, s.parked = s.parked, None
        self.parked_bytes -= s.parked_bytes  # counted once the save completed, whatever came first
        s.parked_bytes = 0
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
            return None
        return fut.result()

    def _active_sessions(self, now: float, within_s: float = 2.0) -> int:
        """Sessions generating right now (a round within the last ``within_s``): the rounds the
        scheduler can expect to batch together."""
        return sum(1 for x in self.sessions.values() if not x.finished and now - x.last_used < within_s)

    def _get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFound(f"unknown session '{session_id}' (expired, deleted, or on another replica)")
        return s

    # --- rounds -------------------------------------------------------------------------------
    async def verify(self, session_id: str, req: VerifyRequest) -> VerifyResponse:
        s = self._get(session_id)
        async with s.lock:
            s.touch()
            self.scheduler.expected_rounds = self._active_sessions(s.last_used)
            if s.last is not None and req.round == s.round:
                return s.last  # a retry: same answer, nothing committed twice
            if req.round != s.round + 1:
                raise Conflict(f"round {req.round} is out of order: the next round is {s.round + 1}")
            if len(req.draft) > self.config.max_draft_bytes:
                raise TooLarge(
                    f"draft of {len(req.draft)} bytes exceeds the limit of {self.config.max_draft_bytes}"
                )
            if s.finished:  # finished at creation (a resumed session that had already ended)
                return self._respond(s, req, [], 0, 0)
            draft = req.draft[: complete_prefix_len(req.draft)]
            # The device's text ends where the last answer did; bytes committed but held back
            # since (an incomplete character, a possible stop string) must open the draft.
            pending = bytes(s.text[s.sent :])
            draft = draft[len(pending) :] if draft.startswith(pending) else b""
            room = min(self.config.max_draft_tokens, s.max_tokens - s.generated - 1)
            candidates = continuation_ids(self.backend.text, s.ids, draft)[: max(room, 0)]
            logits = await self._forward(s, candidates)
            n_acc, correction = greedy_accept(candidates, logits)
            self.hint.observe(s, len(candidates), n_acc)
            old = len(s.ids)
            s.kv_len = old + n_acc  # accepted candidates stay in the KV; the next pass drops the rest
            self._commit(s, candidates[:n_acc] + [correction])
            self.committed_tokens += len(s.ids) - old
            return self._respond(s, req, s.ids[old:], len(candidates), n_acc)

    async def _prefill(self, s: Session) -> None:
        """Evaluate everything but the last committed id (the next round evaluates it with the draft)."""
        if len(s.ids) > 1:
            await self._run(s, s.ids[:-1], n_logits=0)

    async def _forward(self, s: Session, candidates: list[int]):
        return await self._run(s, s.ids + candidates, n_logits=len(candidates) + 1)

    async def _run(self, s: Session, tokens: list[int], n_logits: int):
        """Evaluate ``tokens`` (the session's full sequence) from what its slot already holds."""
        while (slot := self.slots.acquire(s)) is None:
            await asyncio.sleep(0.005)  # every slot is mid-round; one frees within a forward pass
        if s.parked is not None:
            await asyncio.wait([s.parked])
            state = self._unpark(s)
            if state is not None:
                await self.scheduler.call(partial(self.backend.load_state, slot, state))
                s.kv_len = s.parked_len
        start = min(s.kv_len, len(tokens) - max(n_logits, 1))
        try:
            logits = await self.scheduler.forward(slot, start, tokens[start:], n_logits)
        except Exception:
            self.slots.release(s)  # the slot's KV state is unknown now: rebuild next time
            raise
        s.kv_len = len(tokens)
        return logits

    def _commit(self, s: Session, new_ids: list[int]) -> None:
        """Append target ids, stopping at end-of-generation, max_tokens or a stop string."""
        text = self.backend.text
        for t in new_ids:
            if s.finished:
                break
            s.ids.append(t)
            if text.is_eog(t):
                s.finish_reason = "eos"
                break
            before = len(s.text)
            s.text += text.piece(t)
            longest = max((len(x) for x in s.stop), default=0)
            cut = s.find_stop(max(0, before - longest + 1)) if s.stop else None
            if cut is not None:
                del s.text[cut:]
                s.finish_reason = "stop"
            elif s.generated >= s.max_tokens:
                s.finish_reason = "length"

    def _respond(self, s: Session, req: VerifyRequest, new_ids: list[int], n_cand: int, n_acc: int) -> VerifyResponse:
        end = s.sendable_end()
        resp = VerifyResponse(
            round=req.round,
            text=bytes(s.text[s.sent : end]),
            ids=new_ids,
            accepted_bytes=common_prefix_len(s.text[s.sent :], req.draft),
            draft_tokens=n_cand,
            accepted_tokens=n_acc,
            committed_tokens=s.generated,
            finished=s.finished,
            finish_reason=s.finish_reason,
            max_draft_tokens=0 if s.finished else self.hint.limit(s),
        )
        s.sent = end
        s.round = req.round
        s.last = resp
        self.rounds += 1
        return resp

    def close(self) -> None:
        self.scheduler.close()
        self.backend.close()
