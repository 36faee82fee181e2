"""The agent's generation loop: draft, send bytes, take the committed span, repeat."""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from edge_agent.client import VerifierClient, VerifierError
from edge_agent.tli import TliProposer, tli_map
from shared.protocol import ChatMessage, FinishReason, SamplingOptions, SessionCreate, SessionCreated
from shared.sampling import Sampling
from shared.utf8 import complete_prefix_len

if TYPE_CHECKING:
    from edge_agent.drafter import Drafter

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


def _replica_lost(e: VerifierError) -> bool:
    """Whether an error means the session's replica is gone or failing (rather than a bad request):
    unreachable, a 5xx, or a 404 for a session it no longer knows."""
    return e.status == 0 or e.status == 404 or e.status >= 500


def accepted_pieces(pieces: Sequence[bytes], accepted_bytes: int) -> int:
    """How many draft tokens lie wholly inside the accepted byte prefix."""
    n, end = 0, 0
    for p in pieces:
        end += len(p)
        if end > accepted_bytes:
            break
        n += 1
    return n


class Agent:
    def __init__(
        self,
        client: VerifierClient,
        drafter: Drafter | None,
        draft_tokens: int = DEFAULT_DRAFT_TOKENS,
        follow_hint: bool = True,
        sampling_mode: SamplingMode = "auto",
        deadline_s: float = 30.0,
    ) -> None:
        self.client = client
        self.drafter = drafter
        self.draft_tokens = draft_tokens if drafter is not None else 0
        self.follow_hint = follow_hint
        self.sampling_mode = sampling_mode
        self.deadline_s = deadline_s  # no replica answers for this long: the generation fails

    def _tli_mapping(self, request: SessionCreate) -> np.ndarray | None:
        """The drafter -> target id map when this session drafts with TLI: a sampled session, and
        ``tli``, or ``auto`` where the drafter's tokens are the target's (where TLI wins)."""
        if self.drafter is None or request.temperature == 0 or self.sampling_mode == "slem":
            return None
        mapping = tli_map(self.drafter, self.client)
        return mapping.ids if self.sampling_mode == "tli" or mapping.shares_vocabulary else None

    def _open(self, request: SessionCreate, result: GenerationResult) -> SessionCreated:
        """Create the session on the current replica, failing over until one answers or
        ``deadline_s`` has passed without any (then the last error, as a 503)."""
        deadline = time.monotonic() + self.deadline_s
        while True:
            try:
                return self.client.create_session(request)
            except VerifierError as e:
                if not _replica_lost(e) or e.status == 404:
                    raise
                if time.monotonic() > deadline:
                    raise VerifierError(f"no verifier answered for {self.deadline_s:.0f} s: {e}", 503,
                                        "unavailable") from None
                self.client.failover()
                result.failovers += 1

    def _draft(self, k: int, tli: TliProposer | None) -> tuple[list[int], TliProposer | None]:
        """Drafter ids of the next draft; a TLI draft that ends at its first position (nothing the
        drafter wants is a target token) falls back to a plain draft for this round."""
        if self.drafter is None or k <= 0:
            return [], None
        if tli is not None:
            ids = self.drafter.draft(k, tli)
            if ids:
                return ids, tli
        return self.drafter.draft(k), None

    def generate(
        self,
        prompt: str | None = None,
        messages: list[ChatMessage] | None = None,
        max_tokens: int = 128,
        stop: list[str] | None = None,
        on_text: Callable[[bytes], None] | None = None,
        sampling: SamplingOptions | None = None,
    ) -> GenerationResult:
        """Generate one completion. ``sampling`` defaults to greedy decoding; a sampled session
        without a seed gets one from the server (``GenerationResult.seed``), and a session rebuilt
        on another replica keeps it, so its output continues exactly."""
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
        if self.drafter is not None:
            self.drafter.start(prompt, messages)
        tli_mapping = self._tli_mapping(request)
        try:
            while True:
                k = length.for_hint(hint) if self.follow_hint else self.draft_tokens
                proposer = None
                if tli_mapping is not None:
                    rng = np.random.default_rng([created.seed or 0, len(result.ids)])
                    proposer = TliProposer(tli_mapping, Sampling.of(request), rng)
                ids, tli = self._draft(k, proposer)
                pieces = [self.drafter.tokenizer.piece(t) for t in ids] if self.drafter is not None else []
                draft = b"".join(pieces)
                if proposer is not None:
                    result.tli_mass_inside += proposer.mass_inside
                t_round = time.perf_counter()
                try:
                    resp = self.client.verify(session, round_no, draft, tli.target_ids if tli else None,
                                              tli.proposals if tli else None)
                except VerifierError as e:
                    if not _replica_lost(e):
                        raise
                    if e.status != 404:  # unreachable or failing: another replica takes over
                        self.client.failover()
                        result.failovers += 1
                    # Rebuild the session from the ids committed so far (the answer to a round
                    # that was lost in flight was never applied here): output continues exactly.
                    resumed = request.model_copy(
                        update={"resume_ids": list(result.ids), "idempotency_key": uuid.uuid4().hex})
                    session, round_no = self._open(resumed, result).session_id, 1
                    result.resumed += 1
                    continue
                result.round_latencies_s.append(time.perf_counter() - t_round)
                result.rounds += 1
                result.draft_tokens += len(pieces)
                result.accepted_draft_tokens += accepted_pieces(pieces, resp.accepted_bytes)
                length.observe(len(pieces), resp.draft_tokens)
                result.ids += resp.ids
                result.text += resp.text
                if resp.text:
                    if on_text is not None:
                        on_text(resp.text)
                    if self.drafter is not None:
                        self.drafter.commit(resp.text)
                hint, round_no = resp.draft_hint, round_no + 1
                if resp.finished:
                    result.finish_reason = resp.finish_reason
                    break
        finally:
            self.client.delete_session(session)
        result.elapsed_s = time.perf_counter() - t0
        return result


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
