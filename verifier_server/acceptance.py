"""Acceptance rules: which draft candidates the target confirms, and the token it adds after them.

A runner applies a rule *where its logits live* (numpy over llama.cpp's output buffer on the
scheduler thread; torch on a GPU; a remote engine's top-k logprobs) and only the rule's small
result leaves it: full-vocabulary logits never travel to the event loop. A rule is a small frozen
object: its fields are the round's payload (none for greedy; a seed or the draft's probabilities
for the sampling rules to come), its ``accept`` is a pure function of the candidates and the rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from shared.sampling import Sampling, choose


class LogitRows(Protocol):
    """Row ``i`` is the target's next-token logits at the position of ``candidates[i]`` (row
    ``len(candidates)`` follows the last candidate). Rows may be views into a runner's buffer,
    valid only while the rule runs: a rule reads them, it never keeps them."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Acceptance:
    """The outcome of a rule on one round."""

    accepted: int  # how many leading candidates are committed
    token: int  # the target's own token after them (the correction, or the bonus)


class AcceptanceRule(Protocol):
    @property
    def name(self) -> str: ...

    def accept(self, candidates: Sequence[int], rows: LogitRows) -> Acceptance: ...


@dataclass(frozen=True)
class Greedy:
    """String-level exact match at temperature 0: a candidate is accepted while it equals the
    target's argmax, so every committed token is the argmax of the verifier's logits at its
    position. Reads rows lazily: a round rejected at its first candidate costs one argmax."""

    name: str = "greedy"

    def accept(self, candidates: Sequence[int], rows: LogitRows) -> Acceptance:
        n = 0
        while True:
            best = int(np.argmax(rows[n]))
            if n == len(candidates) or candidates[n] != best:
                return Acceptance(n, best)
            n += 1


GREEDY = Greedy()


@dataclass(frozen=True)
class SlemSample:
    """String-level exact match with sampling: at each position the verifier draws its own token
    from the processed target distribution, seeded by (seed, absolute position); candidates are
    accepted while they equal those draws, and the first draw that differs is committed. Every
    committed token is therefore the target's own seeded sample, whatever the drafter proposed."""

    sampling: Sampling
    seed: int
    position: int  # absolute position (index in the session's ids) of the token row 0 predicts
    name: str = "sample-slem"

    def accept(self, candidates: Sequence[int], rows: LogitRows) -> Acceptance:
        n = 0
        while True:
            token = choose(rows[n], self.sampling, self.seed, self.position + n)
            if n == len(candidates) or candidates[n] != token:
                return Acceptance(n, token)
            n += 1
