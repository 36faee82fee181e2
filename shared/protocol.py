"""The wire protocol between edge agents and the verifier, defined once for both sides.

Bodies travel as msgpack (``application/msgpack``, bytes as bin) or JSON (bytes as base64). Draft and
committed text are *bytes*, never str: a draft may end inside a UTF-8 character, and the verifier
only ever returns complete UTF-8 so that a client can decode each chunk on its own.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = 1
API_PREFIX = "/v1"

FinishReason = Literal["eos", "stop", "length"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")


class ChatMessage(_Message):
    role: Literal["system", "user", "assistant"]
    content: str


def chat_transcript(messages: list[ChatMessage]) -> str:
    """A conversation as plain text ending where the assistant speaks, for models without a chat
    template (a base-model drafter reads a chat this way)."""
    return "".join(f"{m.role.capitalize()}: {m.content}\n" for m in messages) + "Assistant:"


class SessionCreate(_Message):
    """Open a generation session: a raw prompt continued as is, or chat messages that the verifier
    renders with the target's own chat template.

    ``resume_ids`` re-creates a session from the target ids an agent already holds (the ids of every
    verify response, concatenated): that is how an agent moves to another replica without losing or
    repeating output.
    """

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = Field(default=128, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    resume_ids: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_prompt_form(self) -> "SessionCreate":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (raw text) or 'messages' (chat)")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


class SessionCreated(_Message):
    session_id: str
    prompt_tokens: int
    max_tokens: int
    # The longest draft (in target tokens) the agent should send in its first round.
    max_draft_tokens: int


class VerifyRequest(_Message):
    """One round: the device's draft as raw bytes. Rounds are numbered from 1; resending the last
    round number returns the same answer without committing anything twice."""

    round: int = Field(ge=1)
    draft: bytes = b""


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
    # Longest draft worth sending next round, in target tokens (0 means: send no draft).
    max_draft_tokens: int


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
