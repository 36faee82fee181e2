"""The boundary between the engine and whatever runs the target model: a *runner* verifies whole
rounds.

The engine (sessions, rounds, bytes <-> ids, stop strings) hands a runner a session key, the
session's committed ids, the round's candidate ids and an acceptance rule; the runner answers how
many candidates it accepted and the target token after them. How it gets there is its own business:
the llama.cpp runner keeps KV slots, rolls back rejected positions, parks idle sessions and batches
rounds of many sessions into shared passes; a torch runner keeps its own KV layout; a remote engine
(SGLang, vLLM) scores the candidates over its prefix cache. Nothing here imports a model runtime.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from shared.alignment import Tokenizer
from shared.protocol import ChatMessage
from verifier_server.acceptance import AcceptanceRule, RowKind
from verifier_server.cost_curve import PassRecord, RoundCost


class RunnerError(RuntimeError):
    """The runner could not verify a round (a failed forward pass, a lost engine). The round
    committed nothing and may be retried; other sessions are unaffected."""


class TargetTokenizer(Tokenizer, Protocol):
    """The target's tokenizer as the engine uses it: alignment, prompts and end-of-generation."""

    n_vocab: int
    kind: str
    chat_template: str | None

    def is_eog(self, token: int) -> bool: ...

    def prompt_ids(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> list[int]: ...


@dataclass(frozen=True)
class RoundOutcome:
    accepted: int  # leading candidates the rule accepted
    token: int  # the target's token after them (correction or bonus)
    queue_s: float = 0.0  # waiting for a pass (the batching window included)
    model_s: float = 0.0  # the forward pass itself
    rule_s: float = 0.0  # applying the acceptance rule to the logits


class Runner(Protocol):
    name: str  # the engine kind, reported by /v1/info
    model_name: str
    sequence_slots: int  # sessions whose state is held for immediate verification
    max_context_tokens: int  # per session: prompt + generated + draft
    max_parked_bytes: int  # host memory for the state of sessions moved out of a slot (0: none)
    # The row kinds it serves in every round: a rule runs here when its ``needs`` is among them
    # (a runner of dense rows serves both). The engine advertises and admits rules by it.
    row_kinds: frozenset[RowKind]

    @property
    def tokenizer(self) -> TargetTokenizer: ...

    async def prefill(self, key: str, ids: Sequence[int]) -> None:
        """Warm the state of session ``key`` with its committed ``ids`` (optional for a runner
        that scores from a prefix cache)."""
        ...

    async def verify(
        self, key: str, ids: Sequence[int], candidates: Sequence[int], rule: AcceptanceRule
    ) -> RoundOutcome:
        """Score ``candidates`` after the committed ``ids`` of session ``key`` and apply ``rule``.

        Safe to cancel: a cancelled or failed round leaves every session's state consistent.
        Raises ``RunnerError`` when the round could not be verified."""
        ...

    def release(self, key: str) -> None:
        """Session ``key`` is gone: free what the runner holds for it."""
        ...

    def expect_rounds(self, n: int) -> None:
        """How many sessions are generating now: the rounds worth waiting for in one pass."""
        ...

    def round_cost(self) -> RoundCost:
        """What a round of n positions costs at the current load (for the draft-length hint)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for /v1/stats, /metrics and the benchmark; ``/metrics`` reads these keys when
        present: ``queued_jobs``, ``parked_sessions``, ``slots_in_use``, ``evictions``, ``rebuilds``."""
        ...

    def add_pass_listener(self, listener: Callable[[PassRecord], None]) -> None:
        """Call ``listener`` after every forward pass (from any thread), for metrics."""
        ...

    def close(self) -> None: ...
