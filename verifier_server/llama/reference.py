"""Plain autoregressive decoding on a backend: the baseline that speculation must reproduce.

One token per forward pass, so it is the "one-by-one" side of the lossless rule: ``greedy_reference``
records the top-2 logit gap of every step (a later divergence is judged by it), and
``teacher_forced_deficits`` checks committed ids position by position against the one-by-one argmax.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from verifier_server.llama.forward import ForwardBackend, ForwardItem
from verifier_server.lossless import Reference, top2_gap


def _one_by_one(backend: ForwardBackend, prompt: list[int], feed: Iterator[int] | None, slot: int) -> Iterator[np.ndarray]:
    """Prefill ``prompt`` and yield the logits row of each next position, one token per pass: the
    token fed at each step is the next one of ``feed``, or the previous row's argmax without it."""
    step = backend.max_batch_tokens
    for start in range(0, len(prompt) - 1, step):
        backend.forward([ForwardItem(slot, start, prompt[start : min(start + step, len(prompt) - 1)], 0)])
    pos, last = len(prompt) - 1, prompt[-1]
    while True:
        row = np.array(backend.forward([ForwardItem(slot, pos, [last], 1)])[0][0])
        yield row
        nxt = next(feed, None) if feed is not None else int(row.argmax())
        if nxt is None:
            return
        pos, last = pos + 1, nxt


def greedy_reference(backend: ForwardBackend, prompt: list[int], max_tokens: int, slot: int = 0) -> Reference:
    ref = Reference()
    for row in _one_by_one(backend, prompt, None, slot):
        token = int(row.argmax())
        ref.ids.append(token)
        ref.gaps.append(top2_gap(row))
        if backend.tokenizer.is_eog(token):
            ref.finish_reason = "eos"
            break
        ref.text += backend.tokenizer.piece(token)
        if len(ref.ids) == max_tokens:
            break
    return ref


def teacher_forced_deficits(backend: ForwardBackend, prompt: list[int], ids: Sequence[int], slot: int = 0) -> list[float]:
    """Feed ``prompt`` + ``ids`` one token at a time; per committed id, how far its logit trails
    the argmax of the one-by-one pass at its position (0.0 where it is the argmax)."""
    if not ids:
        return []
    rows = _one_by_one(backend, prompt, iter(ids[:-1]), slot)
    return [float(row.max() - row[token]) for row, token in zip(rows, ids)]
