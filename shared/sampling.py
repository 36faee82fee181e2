"""Sampling from a model's logits, reproducibly: one processing function and one seeded draw, used
by the verifier, the plain reference and the agent alike.

Processing follows llama.cpp's sampler chain: top-k, then top-p, then min-p (on the probabilities at
temperature 1), then the temperature. Drawing is the Gumbel-max trick with noise from a
*counter-based* generator keyed by (seed, absolute position): the token at a position depends only
on the session's seed, the position and the logits there. It never depends on how many draws came
before, so speculation (drafts of any length, retries, parking, a resume on another replica)
reproduces plain seeded sampling of the target, token for token. And because a draw is the argmax of
perturbed scores, a divergence caused by floating-point noise can only happen where the best two
perturbed scores nearly tie: the same near-tie rule as greedy decoding.
"""
from __future__ import annotations

import argparse
import secrets
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from shared.protocol import SamplingOptions

# Candidates examined before a full sort for top-p (enough for any practical nucleus).
_TOP_P_SHORTLIST = 1024


@dataclass(frozen=True)
class Sampling:
    """A session's sampling parameters; temperature 0 is greedy decoding (the rest is ignored)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def of(cls, opts: SamplingOptions) -> Sampling:
        return cls(opts.temperature, opts.top_k, opts.top_p, opts.min_p)


GREEDY_SAMPLING = Sampling()


def _softmax(x: np.ndarray) -> np.ndarray:
    """Probabilities of logits ``x``: exponentials in float32 (an order of magnitude faster over a
    whole vocabulary), normalised in float64. Every side computes them with this one function."""
    e = np.exp((x - x.max()).astype(np.float32)).astype(np.float64)
    return e / e.sum()


def support(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """Ids of the tokens that survive top-k, top-p and min-p, in increasing id order."""
    x = logits.astype(np.float64)
    ids = np.arange(x.size)
    if 0 < s.top_k < ids.size:
        kth = np.partition(x, -s.top_k)[-s.top_k]
        ids = ids[x >= kth]
    if s.top_p < 1.0:
        xs = x[ids]
        probs = _softmax(xs)
        short = min(_TOP_P_SHORTLIST, ids.size)
        top = np.argpartition(-probs, short - 1)[:short] if short < ids.size else np.arange(ids.size)
        if probs[top].sum() < s.top_p:  # a flat distribution: sort everything
            top = np.arange(ids.size)
        order = top[np.lexsort((ids[top], -probs[top]))]  # by probability, ties by id
        cum = np.cumsum(probs[order])
        keep = int(np.searchsorted(cum, s.top_p)) + 1  # the smallest prefix reaching top_p
        ids = np.sort(ids[order[:keep]])
    if s.min_p > 0.0:
        probs = _softmax(x[ids])
        ids = ids[probs >= s.min_p * probs.max()]
    return ids


def distribution(logits: np.ndarray, s: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """The processed distribution as (ids, probabilities)."""
    ids = support(logits, s)
    return ids, _softmax(logits[ids].astype(np.float64) / s.temperature)


# Independent random streams at one position: the draw itself, and the two of TLI's rejection step.
DRAW, ACCEPT, RESIDUAL = 0, 1, 2


def _rng(seed: int, position: int, stream: int) -> np.random.Generator:
    """A counter-based generator keyed by (seed, position); ``stream`` picks a disjoint counter
    range. Nothing depends on how many numbers were drawn before."""
    return np.random.Generator(np.random.Philox(key=[seed & (2**64 - 1), position], counter=[0, 0, 0, stream]))


def uniform(seed: int, position: int, stream: int) -> float:
    return float(_rng(seed, position, stream).random())


def gumbel_noise(seed: int, position: int, n: int, stream: int = DRAW) -> np.ndarray:
    """Gumbel noise for tokens 0..n-1 at ``position``: a function of (seed, position, stream) alone."""
    u = _rng(seed, position, stream).random(n)
    return -np.log(-np.log(np.maximum(u, np.finfo(np.float64).tiny)))


def scores(logits: np.ndarray, s: Sampling, seed: int, position: int) -> np.ndarray:
    """What a draw maximises, in logit units: the logits when greedy; when sampling, the processed
    logits plus Gumbel noise times the temperature (-inf outside the support). Their argmax is the
    drawn token, and the gap between two tokens' scores is how near they came to a tie."""
    if s.greedy:
        return logits.astype(np.float64)
    ids = support(logits, s)
    out = np.full(logits.size, -np.inf)
    out[ids] = logits[ids].astype(np.float64) + s.temperature * gumbel_noise(seed, position, logits.size)[ids]
    return out


def draw(logits: np.ndarray, s: Sampling, seed: int, position: int) -> tuple[int, float]:
    """The token at ``position`` and its margin: how far its score stands above the runner-up's."""
    x = scores(logits, s, seed, position)
    top = np.argpartition(x, -2)[-2:]
    best, second = (top[1], top[0]) if x[top[1]] >= x[top[0]] else (top[0], top[1])
    return int(best), float(x[best] - x[second])


def choose(logits: np.ndarray, s: Sampling, seed: int, position: int) -> int:
    """The token at ``position`` (greedy: the argmax, without computing a margin)."""
    if s.greedy:
        return int(np.argmax(logits))
    return draw(logits, s, seed, position)[0]


# Slack for the decisions a full row makes from float32 softmax sums (a top-p or min-p boundary)
# and a top-K row from its log-probabilities: a boundary this close is left open, never guessed.
_TOP_TOL = 1e-5
_IN, _MAYBE, _OUT = 2, 1, 0


def choose_top(ids: np.ndarray, logprobs: np.ndarray, n_vocab: int, s: Sampling, seed: int,
               position: int) -> int | None:
    """The token ``choose`` would give on the full row, from its top-K entries alone, or None
    when they cannot settle it.

    ``ids`` are the K most likely ids, best first; ``logprobs`` theirs, normalised over the whole
    vocabulary of ``n_vocab`` ids (log-softmax: a row's logits less one constant, which changes
    neither the support nor the draw). Every id not listed (an *unseen* id) has a log-probability
    at most the K-th's, and a probability at most the mass the K leave, ``1 - sum(exp(logprobs))``.

    Why the answer is exact: the full draw is the argmax, over the support, of ``logprob + T * g``
    with ``g = gumbel_noise(seed, position, n_vocab)``, which is known for every id on the host.
    Each stage of ``support`` is replayed on the K listed ids with those two bounds standing for
    the unseen ones, and gives every listed id, and the unseen ids as one group, a verdict: surely
    in the support, surely out, or undecided. Top-k with ``top_k <= K`` is decided when the
    ``top_k``-th listed log-probability is strictly above every unseen one (the support is then
    listed ids only); with ``top_k > K`` all listed ids survive and top-p's renormalisation mass
    lies between the listed mass and 1. Top-p keeps an id iff the probability of the ids before
    it (by probability, ties by id) is below ``top_p`` times that mass: bounds on both decide it,
    where unseen ids can only come before a listed id that they may tie. Min-p compares each
    probability with ``min_p`` times the best, which is ``exp(logprobs[0])``. Boundaries within
    ``_TOP_TOL`` of flipping (float32 sums on the full side) stay undecided. The answer is then the
    best perturbed score ``w`` among the surely-in ids, *certified* when it beats every undecided
    listed id's score and ``logprobs[-1]`` (or the mass bound) plus ``T`` times the largest noise
    of any unseen id: whichever undecided ids the full row keeps, none can outscore ``w``, and ``w``
    is in. Anything less is None, and the caller must score the full row. Greedy is the first id
    (the smallest of ids tied with it, as ``np.argmax`` picks)."""
    ids = np.asarray(ids, dtype=np.int64)
    lp = np.asarray(logprobs, dtype=np.float64)
    k = ids.size
    if k == 0:
        return None
    if s.greedy:
        return int(ids[lp == lp[0]].min())
    p = np.exp(lp)
    rest = max(1.0 - float(p.sum()), 0.0) + _TOP_TOL  # the mass the unseen ids share, at most
    u = min(float(p[-1]), rest) if n_vocab > k else 0.0  # an unseen id's probability, at most
    lu = float(np.log(u)) if u > 0.0 else -np.inf
    known = np.full(k, _IN)
    unseen = _MAYBE if n_vocab > k else _OUT
    # top-k, and the mass top-p renormalises over (bounds: unseen survivors are unknown)
    z_lo = z_hi = 1.0
    if 0 < s.top_k < n_vocab:
        if s.top_k <= k:
            kth = lp[s.top_k - 1]
            if not kth > lu:  # an unseen id may tie the top_k-th: the cut is unknown
                return None
            known[lp < kth] = _OUT
            unseen = _OUT
            z_lo = z_hi = float(p[lp >= kth].sum())
        else:  # every listed id survives, and some unseen ids do
            z_lo = float(p.sum())
    if s.top_p < 1.0:
        m = np.flatnonzero(known > _OUT)  # listed survivors, in order of probability
        pm = p[m]
        before = np.concatenate(([0.0], np.cumsum(pm)[:-1]))
        # Ids of (nearly) equal probability may come in either order on the full row.
        near = np.abs(pm[:, None] - pm[None, :]) <= _TOP_TOL * pm[:, None]
        idx = np.arange(m.size)
        lo = before - (near * (idx[None, :] < idx[:, None]) * pm[None, :]).sum(axis=1)
        hi = before + (near * (idx[None, :] > idx[:, None]) * pm[None, :]).sum(axis=1)
        if unseen != _OUT:  # unseen ids may come before the listed ids they may tie
            hi = hi + np.where(u >= pm * (1.0 - _TOP_TOL), rest, 0.0)
        verdict = np.where(hi < s.top_p * z_lo - _TOP_TOL, _IN,
                           np.where(lo >= s.top_p * z_hi + _TOP_TOL, _OUT, _MAYBE))
        known[m] = np.minimum(known[m], verdict)
        if unseen != _OUT and p[p > u * (1.0 + _TOP_TOL)].sum() >= s.top_p * z_hi + _TOP_TOL:
            unseen = _OUT  # the ids surely before every unseen one already reach top_p
    if s.min_p > 0.0:
        ratio = np.exp(lp - lp[0])
        verdict = np.where(ratio >= s.min_p * (1.0 + _TOP_TOL), _IN,
                           np.where(ratio < s.min_p * (1.0 - _TOP_TOL), _OUT, _MAYBE))
        known = np.minimum(known, verdict)
        if u < s.min_p * (1.0 - _TOP_TOL) * p[0]:
            unseen = _OUT
    surely = np.flatnonzero(known == _IN)
    if surely.size == 0:
        return None
    g = gumbel_noise(seed, position, n_vocab)
    score = lp + s.temperature * g[ids]
    w = int(surely[np.argmax(score[surely])])
    rival = -np.inf
    undecided = np.flatnonzero(known == _MAYBE)
    if undecided.size:
        rival = float(score[undecided].max())
    if unseen != _OUT:
        g[ids] = -np.inf
        rival = max(rival, lu + s.temperature * float(g.max()))
    if not score[w] > rival + 1e-9:
        return None
    return int(ids[w])


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    """The sampling options of every command that generates (the agent, the plain reference)."""
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this probability")
    ap.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this share of the best")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: a random one, reported)")


def options_from_args(args: argparse.Namespace) -> SamplingOptions:
    """The options, checked by the protocol's own rules; bad values raise ``ValueError`` naming
    the option."""
    try:
        return SamplingOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               min_p=args.min_p, seed=args.seed)
    except ValidationError as e:
        raise ValueError("; ".join(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}" for err in e.errors())) from None


def sampling_from_args(args: argparse.Namespace) -> tuple[Sampling, int]:
    """The options as (sampling, seed), with a random seed when none was given."""
    opts = options_from_args(args)
    return Sampling.of(opts), opts.seed if opts.seed is not None else secrets.randbits(63)
