"""The forward-pass interface the scheduler drives (llama.cpp's backend, or a fake in tests).

A backend owns the model and a KV store of ``n_slots`` sequences. The scheduler is its only caller
and calls it from one thread, so implementations need no locking.
"""
from __future__ import annotations

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
