"""A drafter without a model (Cacheback-style): what followed the same bytes before will follow again.

Two LRU tables map the last ``n`` bytes of the text seen (the prompt and every committed span)
to the bytes that followed them, for a long and a short ``n``. A draft is a chain of look-ups: the
longest context with an entry proposes its follower, which extends the context for the next
look-up. Drafting costs microseconds and no model memory: for boards that cannot hold a model,
and for repetitive text (code edits, JSON, logs), where it proposes long runs that the verifier
accepts. Tables persist across generations (bounded by ``max_entries`` each), so a device learns
its own workload.

Its "tokens" are bytes: a draft of k tokens is k bytes, and the agent's accounting (draft tokens
sent and accepted) counts bytes for it.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from shared.protocol import ChatMessage

ORDERS = (12, 5)  # context lengths in bytes, longest first
FOLLOWER_BYTES = 24  # bytes stored after each context
MAX_ENTRIES = 1 << 16  # per table: about 4 MiB of keys and followers at most


@dataclass
class Proposal:
    """A chained proposal and how much of it came from the long context (the confident part)."""

    text: bytes
    long_bytes: int  # leading bytes proposed by a match of the longest order


class NgramDrafter:
    name = "ngram"

    def __init__(self, orders: Sequence[int] = ORDERS, follower_bytes: int = FOLLOWER_BYTES,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.orders = tuple(sorted(orders, reverse=True))
        self.follower_bytes = follower_bytes
        self.max_entries = max_entries
        self.tables: dict[int, OrderedDict[bytes, bytes]] = {n: OrderedDict() for n in self.orders}
        self.text = bytearray()

    def start(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> None:
        """Begin a generation: the prompt's text is both the context and more to learn from."""
        self.text = bytearray()
        source = prompt if prompt is not None else "\n".join(m.content for m in messages or ())
        self.commit(source.encode())

    def commit(self, text: bytes) -> None:
        """Append committed bytes and learn from them: every context that ends in the new region,
        or whose follower reaches into it, gets its (longer) follower."""
        old = len(self.text)
        self.text += text
        end = len(self.text)
        for n in self.orders:
            table = self.tables[n]
            for i in range(max(n, old - self.follower_bytes + 1), end):
                key = bytes(self.text[i - n : i])
                table[key] = bytes(self.text[i : i + self.follower_bytes])
                table.move_to_end(key)
            while len(table) > self.max_entries:
                table.popitem(last=False)

    def propose(self, k: int) -> Proposal:
        """Up to ``k`` bytes by chained look-ups after the text so far."""
        out = bytearray()
        long_bytes, confident = 0, True
        while len(out) < k:
            context = bytes(self.text[-max(self.orders):] + out)
            follower = b""
            for n in self.orders:
                if len(context) >= n and (follower := self.tables[n].get(context[-n:], b"")):
                    self.tables[n].move_to_end(context[-n:])
                    break
            if not follower:
                break
            confident = confident and n == self.orders[0]
            out += follower[: k - len(out)]
            if confident:
                long_bytes = len(out)
        return Proposal(bytes(out), long_bytes)

    def draft_pieces(self, k: int) -> list[bytes]:
        """The agent's view: a draft of ``k`` one-byte tokens."""
        text = self.propose(k).text
        return [text[i : i + 1] for i in range(len(text))]
