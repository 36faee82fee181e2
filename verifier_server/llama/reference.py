"""Plain autoregressive decoding on a backend: the baseline that speculation must reproduce.

One token per forward pass, so it is the "one-by-one" side of the lossless rule: ``plain_reference``
(greedy, or seeded sampling with the verifier's own draws) records the margin of every step (a later
divergence is judged by it), and ``teacher_forced_deficits`` checks committed greedy ids position by
position against the one-by-one argmax.
"""
from __future__ import annotations

from collections.abc import Generator, Sequence

import numpy as np

from shared.sampling import GREEDY_SAMPLING, Sampling, draw, scores
from verifier_server.llama.forward import ForwardBackend, ForwardItem
from verifier_server.lossless import Reference


def _one_by_one(backend: ForwardBackend, prompt: list[int], slot: int) -> Generator[np.ndarray, int, None]:
    """Prefill ``prompt``, then one token per pass: yields the logits row of the next position and
    takes (by ``send``) the token to feed at it."""
    step = backend.max_batch_tokens
    for start in range(0, len(prompt) - 1, step):
        backend.forward([ForwardItem(slot, start, prompt[start : min(start + step, len(prompt) - 1)], 0)])
    pos, last = len(prompt) - 1, prompt[-1]
    while True:
        last = yield np.array(backend.forward([ForwardItem(slot, pos, [last], 1)])[0][0])
        pos += 1


def plain_reference(backend: ForwardBackend, prompt: list[int], max_tokens: int,
                    sampling: Sampling = GREEDY_SAMPLING, seed: int = 0, slot: int = 0) -> Reference:
    """Plain decoding: greedy, or seeded sampling drawn exactly as the verifier draws."""
    ref = Reference()
    rows = _one_by_one(backend, prompt, slot)
    row = next(rows)
    for position in range(len(prompt), len(prompt) + max_tokens):
        token, margin = draw(row, sampling, seed, position)
        ref.ids.append(token)
        ref.gaps.append(margin)
        if backend.tokenizer.is_eog(token):
            ref.finish_reason = "eos"
            break
        ref.text += backend.tokenizer.piece(token)
        if len(ref.ids) < max_tokens:
            row = rows.send(token)
    return ref


def teacher_forced_deficits(backend: ForwardBackend, prompt: list[int], ids: Sequence[int],
                            sampling: Sampling = GREEDY_SAMPLING, seed: int = 0, slot: int = 0) -> list[float]:
    """Feed ``prompt`` + ``ids`` one token at a time; per committed id, how far its score trails the
    one-by-one choice at its position (0.0 where it is that choice; see ``shared.sampling.scores``)."""
    deficits: list[float] = []
    rows = _one_by_one(backend, prompt, slot)
    row = next(rows)
    for i, token in enumerate(ids):
        x = scores(row, sampling, seed, len(prompt) + i)
        deficits.append(float(x.max() - x[token]))
        if i + 1 < len(ids):
            row = rows.send(token)
    return deficits
