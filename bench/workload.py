"""The benchmark's prompts: raw code completions and chat conversations, one JSON object a line.

A line is ``{"id": ..., "prompt": "..."}`` (continued as is) or ``{"id": ..., "messages": [...]}``
(rendered by each model with its own chat template). The shipped file alternates the two kinds so
that any leading slice, as the quick run takes, holds both.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from shared.protocol import ChatMessage

DEFAULT_WORKLOAD = Path(__file__).with_name("workload.jsonl")


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None

    @classmethod
    def from_json(cls, obj: dict) -> Prompt:
        messages = obj.get("messages")
        if (obj.get("prompt") is None) == (messages is None):
            raise ValueError(f"workload item {obj.get('id')!r}: give exactly one of 'prompt' or 'messages'")
        return cls(
            id=obj["id"],
            prompt=obj.get("prompt"),
            messages=tuple(ChatMessage(**m) for m in messages) if messages is not None else None,
        )

    def to_json(self) -> dict:
        if self.messages is not None:
            return {"id": self.id, "messages": [m.model_dump() for m in self.messages]}
        return {"id": self.id, "prompt": self.prompt}

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else "code"

    @property
    def message_list(self) -> list[ChatMessage] | None:
        """The messages as the agent and ``prompt_ids`` take them."""
        return list(self.messages) if self.messages is not None else None


def prompt_seed(prompt_id: str) -> int:
    """The sampling seed of a prompt in every run: the same text is drawn for it in each mode."""
    return zlib.crc32(prompt_id.encode())


def load(path: Path = DEFAULT_WORKLOAD) -> list[Prompt]:
    with path.open(encoding="utf-8") as f:
        return [Prompt.from_json(json.loads(line)) for line in f if line.strip()]


def share(prompts: list[Prompt], n_devices: int, device: int) -> list[Prompt]:
    """Device ``device``'s prompts: round-robin, so every device gets both kinds and shares differ
    in length by at most one."""
    return prompts[device::n_devices]
