"""The wire protocol between edge agents and the verifier, defined once for both sides.

Bodies travel as msgpack (``application/msgpack``, bytes as bin) or JSON (bytes as base64). Draft and
committed text are *bytes*, never str: a draft may end inside a UTF-8 character, and the verifier
only ever returns complete UTF-8 so that a client can decode each chunk on its own.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = 1
MAX_CHAINED = 3  # unanswered rounds a chained round may follow: at most four rounds in flight
API_PREFIX = "/v1"
# Stop strings a session may give, and the bytes of each: the verifier matches every committed byte
# against each of them, so both are bounded (OpenAI allows 4; 256 bytes holds any end marker).
MAX_STOPS = 16
MAX_STOP_BYTES = 256

FinishReason = Literal["eos", "stop", "length"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")


class ChatMessage(_Message):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingOptions(_Message):
    """How a session samples; the defaults are greedy decoding (see ``shared.sampling``)."""

    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class SessionCreate(SamplingOptions):
    """Open a generation session: a raw prompt continued as is, or chat messages that the verifier
    renders with the target's own chat template.

    ``resume_ids`` re-creates a session from the target ids an agent already holds (the ids of every
    verify response, concatenated): that is how an agent moves to another replica without losing or
    repeating output.

    ``idempotency_key`` makes creation safe to retry: a repeat with the same key (after a read
    timeout, say) returns the session the first request created instead of opening a second one.

    Sampling: ``temperature`` 0 (the default) is greedy decoding; above it the verifier samples
    from the target's distribution after top-k, top-p and min-p (llama.cpp's order, see
    ``shared.sampling``), with draws that depend only on ``seed`` and the position. Without a seed
    the server draws one and returns it, so that any run can be replayed.
    """

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = Field(default=128, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOPS)
    resume_ids: list[int] = Field(default_factory=list)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _one_prompt_form(self) -> SessionCreate:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (raw text) or 'messages' (chat)")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(len(s.encode()) > MAX_STOP_BYTES for s in self.stop):
            raise ValueError(f"stop strings must be at most {MAX_STOP_BYTES} bytes (UTF-8) each")
        return self


class SessionCreated(_Message):
    session_id: str
    prompt_tokens: int
    max_tokens: int
    # The draft length worth sending in the first round, in *target* tokens (a recommendation).
    draft_hint: int
    # The sampling seed in use (the request's, or one the server drew); None when greedy.
    seed: int | None = None


class Proposal(_Message):
    """The distribution q' one TLI draft token was sampled from, over target ids (sparse)."""

    ids: list[int] = Field(min_length=1)
    probs: list[float] = Field(min_length=1)


class VerifyRequest(_Message):
    """One round: the device's draft as raw bytes. Rounds are numbered from 1; resending the last
    round number returns the same answer without committing anything twice.

    A TLI round (token-level intersection, sampled sessions) also sends the draft as target ids,
    each with the distribution q' the drafter sampled it from; ``draft`` must then be their bytes.

    A *chained* round is sent before the answers to the ``chained`` rounds before it have come
    back (pipelined drafting: several rounds in flight). Its ``draft`` continues the text the
    device had before those answers, betting that they commit a prefix of it; the verifier drafts
    with what follows their text. When the draft does not start with that text (the bet lost), or
    the round did not arrive right after the one it follows, the round is *stale*: it commits
    nothing and does not use up its number, which the device then sends again with a fresh draft.
    """

    round: int = Field(ge=1)
    draft: bytes = b""
    chained: int = Field(default=0, ge=0, le=MAX_CHAINED)
    draft_ids: list[int] | None = None
    proposals: list[Proposal] | None = None

    @model_validator(mode="after")
    def _tli_round(self) -> VerifyRequest:
        if (self.draft_ids is None) != (self.proposals is None):
            raise ValueError("a TLI round gives both 'draft_ids' and 'proposals', or neither")
        if self.draft_ids is None or self.proposals is None:
            return self
        if self.chained:
            raise ValueError("a TLI round cannot be chained")
        if len(self.draft_ids) != len(self.proposals):
            raise ValueError(f"{len(self.draft_ids)} draft_ids but {len(self.proposals)} proposals")
        for i, (token, q) in enumerate(zip(self.draft_ids, self.proposals)):
            if len(q.ids) != len(q.probs):
                raise ValueError(f"proposals[{i}]: {len(q.ids)} ids but {len(q.probs)} probs")
            if len(set(q.ids)) != len(q.ids):
                raise ValueError(f"proposals[{i}]: repeated ids")
            if any(not 0.0 <= x <= 1.0 for x in q.probs) or abs(sum(q.probs) - 1.0) > 1e-3:
                raise ValueError(f"proposals[{i}]: probs must lie in [0, 1] and sum to 1 (sum {sum(q.probs):.6f})")
            if token not in q.ids or q.probs[q.ids.index(token)] <= 0.0:
                raise ValueError(f"proposals[{i}]: draft id {token} has no probability in its proposal")
        return self


class VerifyResponse(_Message):
    round: int
    # Newly committed text, complete UTF-8 only (an incomplete tail waits for the next round).
    text: bytes
    # Newly committed target token ids (opaque to the device; kept for recovery).
    ids: list[int]
    # How many leading bytes of the draft the committed text confirmed.
    accepted_bytes: int
    # The draft re-tokenized by the target: candidates proposed and accepted, in target tokens.
    draft_tokens: int
    accepted_tokens: int
    committed_tokens: int
    finished: bool
    finish_reason: FinishReason | None = None
    # The draft length worth sending next round, in *target* tokens: a recommendation from the
    # server's cost and this session's acceptance (0: drafting does not pay, send none). The
    # agent converts it into its own tokens; drafts longer than ``Limits.max_draft_tokens`` are cut.
    draft_hint: int
    # Seconds the round spent in the verifier (queue and forward pass included): the device's
    # draft controller tells network time from server time with it.
    server_s: float = 0.0
    # A chained round whose bet lost: nothing committed, the round number is still free.
    stale: bool = False


class Limits(_Message):
    max_draft_bytes: int
    max_draft_tokens: int
    max_context_tokens: int
    max_sessions: int
    sequence_slots: int
    # Host memory for the KV state of sessions parked out of their slot.
    max_parked_bytes: int


class ServerInfo(_Message):
    protocol_version: int
    # Content hash of the target vocabulary (``GET /v1/vocab``), for an agent's cache.
    vocab_hash: str
    model: str
    backend: str
    n_vocab: int
    tokenizer: str
    chat_template: bool
    capabilities: list[str]
    limits: Limits


class ErrorBody(_Message):
    code: str
    message: str


class ErrorResponse(_Message):
    error: ErrorBody


class Vocabulary(_Message):
    """The target's vocabulary as the bytes of every id (empty for control tokens), for TLI."""

    hash: str
    pieces: list[bytes]
