"""Chat conventions both sides share, independent of any model runtime."""
from __future__ import annotations

from collections.abc import Sequence

from shared.protocol import ChatMessage


class ChatTemplateError(ValueError):
    """The model has no chat template, or it failed to render the conversation."""


def chat_transcript(messages: Sequence[ChatMessage]) -> str:
    """A conversation as plain text ending where the assistant speaks, for models without a chat
    template (a base-model drafter reads a chat this way)."""
    return "".join(f"{m.role.capitalize()}: {m.content}\n" for m in messages) + "Assistant:"
