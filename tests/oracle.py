"""A target model without a model, for tests of the bookkeeping around it: ``OracleRunner``'s
target continues ``PROMPT`` with a fixed text and then EOS, over a tokenizer of bytes, and verifies
rounds with the real acceptance rules on one-hot logits."""
from __future__ import annotations

import asyncio

import numpy as np

from shared.chat import ChatTemplateError
from verifier_server.acceptance import RowKind
from verifier_server.cost_curve import CostCurve, LoadModel
from verifier_server.runner import RoundOutcome

EOS = 256
PROMPT = "Q:"


class ByteTokenizer:
    n_vocab = 257
    kind = "bytes"
    chat_template = None

    def encode(self, text: bytes) -> list[int]:
        return list(text)

    def piece(self, token: int) -> bytes:
        return b"" if token == EOS else bytes([token])

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def prompt_ids(self, prompt, messages) -> list[int]:
        if messages is not None:
            raise ChatTemplateError("this model has no chat template; send a raw prompt instead")
        return list(prompt.encode())


class OracleRunner:
    """Its target continues PROMPT with ``continuation`` and then EOS; rounds are verified by the
    real acceptance rule on one-hot logits. ``gate`` holds rounds (and prefills) until set
    (``held`` counts those it holds now); ``fail`` makes the next round raise."""

    name = "oracle"
    model_name = "oracle"
    sequence_slots = 4
    max_context_tokens = 4096
    max_parked_bytes = 0
    row_kinds = frozenset({RowKind.TOP, RowKind.FULL})  # dense rows

    def __init__(self, continuation: str) -> None:
        self.tokenizer = ByteTokenizer()
        self.target = list(continuation.encode()) + [EOS]
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0
        self.fail: Exception | None = None
        self.rounds = 0
        self.prefilled: list[str] = []
        self.released: list[str] = []
        self.load = LoadModel(CostCurve({1: 0.01, 16: 0.01}))  # a flat curve: drafting pays

    async def _pass_gate(self) -> None:
        self.held += 1
        try:
            await self.gate.wait()
        finally:
            self.held -= 1

    async def until_held(self, n: int = 1) -> None:
        """Returns once ``n`` calls wait at the gate (turns of the event loop, not time)."""
        while self.held < n:
            await asyncio.sleep(0)

    async def prefill(self, key, ids) -> None:
        await self._pass_gate()
        self.prefilled.append(key)

    async def verify(self, key, ids, candidates, rule) -> RoundOutcome:
        await self._pass_gate()
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error
        self.rounds += 1
        at = len(ids) - len(PROMPT)
        rows = np.zeros((len(candidates) + 1, self.tokenizer.n_vocab), dtype=np.float32)
        for i in range(len(rows)):
            rows[i, self.target[min(at + i, len(self.target) - 1)]] = 1.0
        acceptance = rule.accept(list(candidates), rows)
        return RoundOutcome(acceptance.accepted, acceptance.token)

    def release(self, key: str) -> None:
        self.released.append(key)

    def expect_rounds(self, n: int) -> None:
        pass

    def round_cost(self):
        return self.load.round_cost()

    def add_pass_listener(self, listener) -> None:
        pass  # no forward passes to report

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


async def settle() -> None:
    """Let every task that is ready run until it blocks (on a lock, the gate): a few turns of the
    event loop, which involve no time and no other thread."""
    for _ in range(20):
        await asyncio.sleep(0)
