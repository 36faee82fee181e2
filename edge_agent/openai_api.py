"""The OpenAI-compatible surface of the device daemon: request models, and the answers and stream
chunks in OpenAI's formats.

Unknown fields are ignored, as OpenAI-compatible servers do; fields that would change the result in
ways this server does not implement (``n`` > 1, ``logprobs``, ``tools``, ...) are refused naming
the field, so that an app never gets a silently different answer.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_agent.agent import GenerationResult
from edge_agent.client import VerifierError
from shared.protocol import MAX_STOP_BYTES, MAX_STOPS, ChatMessage, SamplingOptions

SYSTEM = "sled-speculative"  # the target's own output, verified
LOCAL_FALLBACK = "sled-local-fallback"  # the drafter alone: no verifier was reachable

# OpenAI's finish reasons: the end of generation and a stop string are both "stop".
FINISH = {"eos": "stop", "stop": "stop", "length": "length", None: None}


class ApiError(Exception):
    """An error in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    @classmethod
    def from_verifier(cls, e: VerifierError) -> ApiError:
        """A verifier's refusal keeps its 4xx, except that a refused device token is a 502: the
        app's own key is not at fault (a 401 would say it is). An unreachable or failing verifier
        is a 503."""
        if e.status == 0 or e.status == 404 or e.status >= 500:
            return cls(503, str(e), kind="server_error")
        if e.status in (401, 403):
            return cls(502, f"the verifier refused this device's token: {e}", kind="server_error")
        return cls(e.status, str(e))

    @classmethod
    def internal(cls) -> ApiError:
        """Any other failure: a 500 that names no internals (the daemon's log has them)."""
        return cls(500, "the generation failed inside the daemon (its log says why)", kind="server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Fields that change the result, refused unless at their neutral value.
    n: int | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        refused = {
            "n": self.n not in (None, 1),
            "best_of": self.best_of not in (None, 1),
            "logprobs": bool(self.logprobs),
            "top_logprobs": bool(self.top_logprobs),
            "tools": bool(self.tools),
            "functions": bool(self.functions),
            "response_format": self.response_format not in (None, {"type": "text"}),
            "echo": bool(self.echo),
            "suffix": bool(self.suffix),
        }
        for field, bad in refused.items():
            if bad:
                raise ApiError(400, f"'{field}' is not supported by this server", field)

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        """The verifier's bounds, checked here so that the app gets a 400 naming ``stop`` rather
        than a failed session."""
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings ({len(stops)} given)")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s.encode()) > MAX_STOP_BYTES for s in stops):
            raise ValueError(f"each stop string is at most {MAX_STOP_BYTES} bytes in UTF-8")
        return stop

    def limit(self, default: int, cap: int | None) -> int:
        """The token budget: ``max_completion_tokens``, else ``max_tokens``, else ``default``.
        ``cap`` (the smaller of the drafter's and the verifier's context, None if neither is
        known) bounds it: asking for more is a 400 naming the field given, since no generation
        could ever reach it; the default is only lowered to it."""
        for field in ("max_completion_tokens", "max_tokens"):
            asked: int | None = getattr(self, field)
            if asked is None:
                continue
            if cap is not None and asked > cap:
                raise ApiError(400, f"'{field}' is {asked}, beyond the {cap} tokens this device's context holds", field)
            return asked
        return default if cap is None else min(default, cap)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> SamplingOptions:
        try:
            return SamplingOptions(temperature=self.temperature or 0.0, top_p=1.0 if self.top_p is None else self.top_p,
                                   seed=self.seed)
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0])
            raise ApiError(400, f"'{field}': {err['msg']}", field) from None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def plain(self) -> ChatMessage:
        """As the protocol's message: text parts joined, ``developer`` read as ``system``."""
        if isinstance(self.content, list):
            if any(part.get("type") != "text" for part in self.content):
                raise ApiError(400, "only text content parts are supported", "messages")
            text = "".join(str(part.get("text", "")) for part in self.content)
        else:
            text = self.content or ""
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


class ChatRequest(_Request):
    messages: list[ChatMessageIn] = Field(min_length=1)

    def prompt_form(self) -> tuple[str | None, list[ChatMessage] | None]:
        """The session's prompt: chat messages (and no raw text)."""
        return None, [m.plain() for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str]

    def prompt_form(self) -> tuple[str | None, list[ChatMessage] | None]:
        """The session's prompt: raw text (and no messages)."""
        if isinstance(self.prompt, str):
            return self.prompt, None
        if len(self.prompt) != 1:
            raise ApiError(400, "one prompt per request is supported", "prompt")
        return self.prompt[0], None


def _mark(answer: dict[str, Any], result: GenerationResult) -> dict[str, Any]:
    """An answer from the drafter alone says so where clients look: ``system_fingerprint``."""
    if result.local_fallback:
        answer["system_fingerprint"] = LOCAL_FALLBACK
    return answer


def speculation(result: GenerationResult) -> dict[str, Any]:
    """The extra field that carries the round figures (apps may ignore it)."""
    s = result.summary()
    keys = ("rounds", "draft_tokens", "accepted_draft_tokens", "tokens_per_round", "resumed", "failovers", "seed",
            "local_fallback")
    return {k: s[k] for k in keys}


def usage(prompt_tokens: int, result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": result.committed_tokens,
            "total_tokens": prompt_tokens + result.committed_tokens}


class Reply:
    """One request's identity and the shapes of its answer, chat or text completion."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM, "choices": choices, **extra}

    def complete(self, text: str, result: GenerationResult, prompt_tokens: int) -> dict[str, Any]:
        finish = FINISH[result.finish_reason]
        if self.chat:
            message = {"role": "assistant", "content": text, "refusal": None}  # OpenAI requires refusal
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            out = self._envelope("chat.completion", [choice], usage=usage(prompt_tokens, result),
                                 sled=speculation(result))
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            out = self._envelope("text_completion", [choice], usage=usage(prompt_tokens, result),
                                 sled=speculation(result))
        return _mark(out, result)

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish,
                                                             "logprobs": None}])
        return self._envelope("text_completion", [{"index": 0, "text": text or "", "finish_reason": finish,
                                                   "logprobs": None}])

    def final_chunk(self, result: GenerationResult, prompt_tokens: int, include_usage: bool) -> list[dict[str, Any]]:
        last = _mark(self.chunk(None, FINISH[result.finish_reason]), result)
        last["sled"] = speculation(result)
        out = [last]
        if include_usage:
            out.append(self._envelope("chat.completion.chunk" if self.chat else "text_completion", [],
                                      usage=usage(prompt_tokens, result)))
        return out
