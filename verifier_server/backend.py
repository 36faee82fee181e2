"""The interface every target-model backend implements (llama.cpp now, torch later).

A backend owns the model and a KV store of ``n_slots`` sequences. The scheduler is its only caller
and calls it from one thread, so implementations need no locking.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from shared.alignment import Tokenizer


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


class TargetText(Tokenizer, Protocol):
    """The target tokenizer as the verifier uses it (alignment plus prompts and end-of-generation)."""

    n_vocab: int
    kind: str
    chat_template: str | None

    def is_eog(self, token: int) -> bool: ...

    def prompt_ids(self, prompt: str | None, messages: Sequence) -> list[int]: ...


class Backend(Protocol):
    name: str
    model_name: str
    text: TargetText
    n_slots: int
    ctx_per_slot: int
    max_batch_tokens: int
    n_params: int

    def forward(self, items: Sequence[ForwardItem]) -> list[np.ndarray]:
        """One batched forward pass; returns, per item, logits of shape (n_logits, n_vocab)."""
        ...

    def save_state(self, slot: int) -> bytes:
        """The slot's KV state, to park a session in host memory."""
        ...

    def load_state(self, slot: int, state: bytes) -> None:
        """Put a parked session's state into ``slot`` (replacing what it held)."""
        ...

    def close(self) -> None: ...
