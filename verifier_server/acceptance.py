"""Acceptance rules: which draft candidates the target confirms. Pure functions of logits."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def greedy_accept(candidates: Sequence[int], logits: np.ndarray) -> tuple[int, int]:
    """String-level exact match, greedy.

    ``logits[i]`` is the target's distribution for the position of ``candidates[i]`` (row
    ``len(candidates)`` follows the last candidate). Returns how many leading candidates equal the
    target's argmax, and the target's own token at the first position that is not accepted (the
    correction, or the bonus token after a fully accepted draft). Every committed token is therefore
    the argmax of the verifier's logits at its position.
    """
    best = logits.argmax(axis=1)
    n = 0
    while n < len(candidates) and candidates[n] == best[n]:
        n += 1
    return n, int(best[n])


def top2_gap(row: np.ndarray) -> float:
    """Logit gap between the best and second-best token: how close a greedy choice was to a tie."""
    top = np.partition(row, -2)[-2:]
    return float(top[1] - top[0])
