"""The forward-pass interface the scheduler drives (llama.cpp's backend, or a fake in tests).

A backend owns the model and a KV store of ``n_slots`` sequences. The scheduler is its only caller
and calls it from one thread, so implementations need no locking.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from verifier_server.acceptance import LogitRows
from verifier_server.runner import TargetTokenizer


@dataclass(frozen=True)
class ForwardItem:
    """Evaluate ``tokens`` in sequence ``slot`` at positions ``pos, pos+1, ...``.

    Everything the slot held at ``pos`` or later is discarded first (rollback of rejected drafts,
    or reuse of a slot left by another session). Logits are wanted for the last ``n_logits`` tokens.
    """

    slot: int
    pos: int
    tokens: Sequence[int]
    n_logits: int


class ForwardBackend(Protocol):
    name: str
    model_name: str
    n_slots: int
    ctx_per_slot: int
    max_batch_tokens: int
    n_params: int

    @property
    def tokenizer(self) -> TargetTokenizer: ...

    def forward(self, items: Sequence[ForwardItem]) -> list[LogitRows]:
        """One batched forward pass; per item, its ``n_logits`` rows of logits. Rows may be views
        into the backend's output buffer: valid until the next call."""
        ...

    def save_state(self, slot: int) -> bytes:
        """The slot's KV state, to park a session in host memory."""
        ...

    def load_state(self, slot: int, state: bytes) -> None:
        """Put a parked session's state into ``slot`` (replacing what it held)."""
        ...

    def close(self) -> None: ...


class FixedCostBackend:
    """A backend whose every forward pass takes at least ``pass_s`` (it sleeps the rest): emulates
    a GPU verifier, whose pass costs about the same for 1 or 100 tokens (memory-bound), on a CPU
    machine, for measuring the device side against a realistic verifier. The cost curve measured at
    start-up sees the padded passes, so the draft-length hint is a GPU's."""

    def __init__(self, inner: ForwardBackend, pass_s: float) -> None:
        self.inner = inner
        self.pass_s = pass_s
        self.name = f"{inner.name}, fixed {pass_s * 1e3:g} ms passes"
        self.model_name = inner.model_name
        self.n_slots = inner.n_slots
        self.ctx_per_slot = inner.ctx_per_slot
        self.max_batch_tokens = inner.max_batch_tokens
        self.n_params = inner.n_params

    @property
    def tokenizer(self) -> TargetTokenizer:
        return self.inner.tokenizer

    def forward(self, items: Sequence[ForwardItem]) -> list[LogitRows]:
        t0 = time.perf_counter()
        rows = self.inner.forward(items)
        time.sleep(max(0.0, self.pass_s - (time.perf_counter() - t0)))
        return rows

    def save_state(self, slot: int) -> bytes:
        return self.inner.save_state(slot)

    def load_state(self, slot: int, state: bytes) -> None:
        self.inner.load_state(slot, state)

    def close(self) -> None:
        self.inner.close()
