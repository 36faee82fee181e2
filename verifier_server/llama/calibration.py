"""The cost curve t(B) of a backend, measured: the verifier's start-up calibration of its draft
hint and the benchmark's profile of a target use this one routine."""
from __future__ import annotations

import time

from verifier_server.llama.forward import ForwardBackend, ForwardItem

_FILLER = b"def add(a, b):\n    return a + b\n\n"


def measure_cost_curve(backend: ForwardBackend, sizes: tuple[int, ...], repeats: int = 1, slot: int = 0) -> dict[int, float]:
    """Seconds of one forward pass of B tokens, for each B in ``sizes`` (best of ``repeats``), on
    ``slot`` from position 0, with logits at every position as a verify round asks for them (the
    output layer is a large share of a small model's pass). Run before serving: it uses the slot."""
    tokens = backend.tokenizer.encode(_FILLER * (max(sizes) // 4 + 1))[: max(sizes)]
    if len(tokens) < max(sizes):
        raise ValueError("the filler text is too short for the cost curve")
    backend.forward([ForwardItem(slot, 0, tokens[:1], 1)])  # warm-up
    points = {}
    for b in sizes:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            backend.forward([ForwardItem(slot, 0, tokens[:b], b)])
            best = min(best, time.perf_counter() - t0)
        points[b] = best
    return points
