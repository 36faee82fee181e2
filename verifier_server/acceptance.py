"""Acceptance rules: which draft candidates the target confirms, and the token it adds after them.

A runner applies a rule *where its logits live* (numpy over llama.cpp's output buffer on the
scheduler thread; torch on a GPU; a remote engine's top-k logprobs) and only the rule's small
result leaves it: full-vocabulary logits never travel to the event loop. A rule is a small frozen
object: its fields are the round's payload (none for greedy; a seed or the draft's probabilities
for the sampling rules), its ``accept`` is a pure function of the candidates and the rows.

Rows come in two kinds (``RowKind``): dense rows over the whole vocabulary, which every rule reads,
and ``TopRow``s, the K best ids of a position with their log-probabilities, which an engine such as
vLLM gives cheaply. A rule says which it needs (``needs``): greedy and seeded SLEM settle from top-K
rows (SLEM through a certificate, raising ``Uncertified`` when it fails: the runner then scores the
round again with full rows), TLI's residual needs the whole row.
"""
from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeAlias

import numpy as np

from shared.protocol import Proposal
from shared.sampling import (
    ACCEPT,
    GREEDY_SAMPLING,
    RESIDUAL,
    Sampling,
    choose,
    choose_top,
    distribution,
    gumbel_noise,
    uniform,
)


class RowKind(enum.Enum):
    """What a row holds: the K best ids of a position (``TOP``), or the whole vocabulary (``FULL``)."""

    TOP = "top"
    FULL = "full"


@dataclass(frozen=True)
class TopRow:
    """A top-K row: the K most likely ids at a position, best first, and their log-probabilities
    (log-softmax over the whole vocabulary, so ``exp`` of each is the token's true probability),
    descending. Every id not listed is at most as likely as ``ids[-1]``."""

    ids: np.ndarray  # int64
    logprobs: np.ndarray  # float64
    n_vocab: int


class Uncertified(Exception):
    """Top-K rows cannot settle this round exactly: score it again with full rows."""


Row: TypeAlias = "np.ndarray | TopRow"


class LogitRows(Protocol):
    """Row ``i`` is the target's next-token logits at the position of ``candidates[i]`` (row
    ``len(candidates)`` follows the last candidate): a dense row, or a ``TopRow``. Rows may be
    views into a runner's buffer, valid only while the rule runs: a rule reads them, it never
    keeps them."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Row: ...


def row_token(row: Row, s: Sampling, seed: int, position: int) -> int:
    """The target's own token at ``position`` from a row of either kind: the argmax when ``s`` is
    greedy, else the seeded draw. A top-K row that cannot settle the draw raises ``Uncertified``."""
    if isinstance(row, TopRow):
        token = choose_top(row.ids, row.logprobs, row.n_vocab, s, seed, position)
        if token is None:
            raise Uncertified(f"the top {row.ids.size} ids cannot settle the draw at position {position}")
        return token
    return choose(row, s, seed, position)


@dataclass(frozen=True)
class Acceptance:
    """The outcome of a rule on one round."""

    accepted: int  # how many leading candidates are committed
    token: int  # the target's own token after them (the correction, or the bonus)


class AcceptanceRule(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def needs(self) -> RowKind:
        """The rows the rule can settle a round from (dense rows always do)."""
        ...

    def accept(self, candidates: Sequence[int], rows: LogitRows) -> Acceptance: ...


@dataclass(frozen=True)
class Greedy:
    """String-level exact match at temperature 0: a candidate is accepted while it equals the
    target's argmax, so every committed token is the argmax of the verifier's logits at its
    position. Reads rows lazily: a round rejected at its first candidate costs one argmax."""

    name: str = "greedy"
    needs: ClassVar[RowKind] = RowKind.TOP  # the top-1 id is the argmax

    def accept(self, candidates: Sequence[int], rows: LogitRows) -> Acceptance:
        n = 0
        while True:
            best = row_token(rows[n], GREEDY_SAMPLING, 0, 0)
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
    needs: ClassVar[RowKind] = RowKind.TOP  # certified from top-K rows (``choose_top``), or Uncertified

    def accept(self, candidates: Sequence[int], rows: LogitRows) -> Acceptance:
        n = 0
        while True:
            token = row_token(rows[n], self.sampling, self.seed, self.position + n)
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
    needs: ClassVar[RowKind] = RowKind.FULL  # the residual max(0, p - q) spans the whole vocabulary

    def accept(self, candidates: Sequence[int], rows: LogitRows) -> Acceptance:
        for n, candidate in enumerate(candidates):
            row = rows[n]
            if isinstance(row, TopRow):
                raise Uncertified("a TLI round needs full-vocabulary rows")
            p_ids, p = distribution(row, self.sampling)
            token = rejection_step(p_ids, p, self.proposals[n], candidate, self.seed, self.position + n, row.size)
            if token is not None:
                return Acceptance(n, token)
        n = len(candidates)
        return Acceptance(n, row_token(rows[n], self.sampling, self.seed, self.position + n))
