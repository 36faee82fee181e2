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

from shared.protocol import Proposal
from shared.sampling import ACCEPT, RESIDUAL, Sampling, choose, distribution, gumbel_noise, uniform


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


def rejection_step(p_ids: np.ndarray, p: np.ndarray, q: Proposal, candidate: int,
                   seed: int, position: int, n_vocab: int) -> int | None:
    """One step of speculative sampling: None if ``candidate`` (drawn from q) is accepted, with
    probability min(1, p(x)/q(x)); otherwise the token drawn from normalize(max(0, p - q)). Both
    random choices come from the session's counter-based streams at ``position``, so a replay is
    exact. The output is distributed exactly as p. Dense over the vocabulary: no sort, no loop."""
    dense_p = np.zeros(n_vocab)
    dense_p[p_ids] = p
    dense_q = np.zeros(n_vocab)
    dense_q[np.asarray(q.ids)] = q.probs
    if uniform(seed, position, ACCEPT) * dense_q[candidate] < dense_p[candidate]:
        return None
    residual = np.maximum(dense_p - dense_q, 0.0)
    if residual.sum() <= 0.0:  # p == q up to rounding: the residual is p itself
        residual = dense_p
    with np.errstate(divide="ignore"):
        scores = np.log(residual) + gumbel_noise(seed, position, n_vocab, RESIDUAL)
    return int(np.argmax(scores))


@dataclass(frozen=True)
class TliSample:
    """Token-level intersection: the drafter sampled each candidate from q' (its own processed
    distribution restricted to tokens whose bytes are one target token, renormalised) and sends q';
    the verifier runs standard speculative sampling against the processed target distribution p.
    After a fully accepted draft the bonus is the target's own seeded draw."""

    sampling: Sampling
    seed: int
    position: int
    proposals: tuple[Proposal, ...]
    name: str = "sample-tli"

    def accept(self, candidates: Sequence[int], rows: LogitRows) -> Acceptance:
        for n, candidate in enumerate(candidates):
            row = rows[n]
            p_ids, p = distribution(row, self.sampling)
            token = rejection_step(p_ids, p, self.proposals[n], candidate, self.seed, self.position + n, row.size)
            if token is not None:
                return Acceptance(n, token)
        n = len(candidates)
        return Acceptance(n, choose(rows[n], self.sampling, self.seed, self.position + n))
