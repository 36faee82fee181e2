"""Batches the forward work of all sessions into shared forward passes.

Verify rounds and prompt prefills from every device queue here; one worker thread owns the backend
and repeatedly takes what is waiting (after a short window that lets concurrent rounds meet), up to
a token budget, and runs it as one forward pass. Long prefills are split into chunks so that they
never stall other devices' rounds for more than one budget's worth of tokens. The asyncio side only
awaits futures, so the event loop keeps serving while the model runs.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from verifier_server.backend import Backend, ForwardItem


# The longest a pass waits for expected rounds, as a share of a recent pass (measured: 0.5 batched
# four staggered devices into fuller passes, raising throughput and lowering latency on a CPU).
WAIT_FRACTION = 0.5


@dataclass
class _Job:
    slot: int
    pos: int
    tokens: list[int]
    n_logits: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class SchedulerStats:
    """Counters the benchmark and the draft-length hint read."""

    forward_passes: int = 0
    round_passes: int = 0  # passes made of verify rounds only (those in ``recent``)
    positions: int = 0
    busy_s: float = 0.0
    # Recent passes made of verify rounds only, as (tokens, seconds, rounds): the cost curve that
    # the draft-length hint fits (prefill passes would make positions look cheaper than they are).
    recent: deque = field(default_factory=lambda: deque(maxlen=256))
    # Every pass's token count (B -> passes): replayed by the benchmark through a GPU cost model.
    batch_sizes: Counter = field(default_factory=Counter)


class Scheduler:
    def __init__(self, backend: Backend, token_budget: int, wait_window_s: float = 0.002) -> None:
        self.backend = backend
        self.token_budget = token_budget
        self.wait_window_s = wait_window_s
        self.stats = SchedulerStats()
        # How many rounds to expect at once: the sessions currently generating (set by the engine).
        self.expected_rounds = 1
        self._queue: deque[_Job] = deque()
        # Work on the backend's memory (parking sessions), run between passes in submission order.
        self._calls: deque[tuple[Callable[[], object], asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="sled-scheduler", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], object]) -> asyncio.Future:
        """Run ``fn`` on the worker thread before the next pass. Queued at once: forward work
        submitted afterwards sees its effect (a slot saved before its new owner overwrites it)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            self._calls.append((fn, fut, loop))
            self._cv.notify()
        return fut

    async def forward(self, slot: int, pos: int, tokens: list[int], n_logits: int) -> np.ndarray:
        """Evaluate ``tokens`` for ``slot`` from ``pos`` on (discarding whatever the slot held there)
        and return the logits of the last ``n_logits`` of them."""
        if n_logits > self.token_budget:
            raise ValueError(f"{n_logits} logit positions exceed the token budget {self.token_budget}")
        loop = asyncio.get_running_loop()
        job = _Job(slot, pos, list(tokens), n_logits, loop.create_future(), loop)
        with self._cv:
            self._queue.append(job)
            self._cv.notify()
        return await job.future

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _gather(self) -> None:
        """Let concurrent rounds meet (called with the lock held, work queued): wait until every
        active session has its round queued, but no longer than the wait window or half of a
        recent pass, whichever is longer. On a slow server more rounds per pass are worth a short
        wait; on a fast one the wait stays within the configured window."""
        recent = list(self.stats.recent)[-16:]
        mean_pass = sum(dt for _, dt, _ in recent) / len(recent) if recent else 0.0
        deadline = time.monotonic() + max(self.wait_window_s, WAIT_FRACTION * mean_pass)
        while not self._stopped and len(self._queue) < self.expected_rounds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cv.wait(remaining)

    def _take(self) -> tuple[list[ForwardItem], list[_Job]]:
        """Pop work up to the token budget: first every job that fits whole (verify rounds, in
        arrival order), then the oldest job left, whole or as a chunk (a long prefill, whose
        remainder stays queued). Rounds never wait behind a long prompt, and a quarter of the
        pass is kept for a waiting prefill so that heavy round traffic cannot starve it either."""
        items: list[ForwardItem] = []
        done: list[_Job] = []
        budget = self.token_budget
        reserve = budget // 4 if any(len(j.tokens) > budget for j in self._queue) else 0

        def take_whole(job: _Job) -> None:
            nonlocal budget
            self._queue.remove(job)
            items.append(ForwardItem(job.slot, job.pos, job.tokens, job.n_logits))
            done.append(job)
            budget -= len(job.tokens)

        for job in list(self._queue):
            if len(job.tokens) <= budget - reserve:
                take_whole(job)
        if self._queue:
            job = self._queue[0]
            if len(job.tokens) <= budget:
                take_whole(job)
            else:  # a chunk needs no logits; the logit positions stay with the remainder
                chunk = min(budget, len(job.tokens) - job.n_logits)
                if chunk > 0:
                    items.append(ForwardItem(job.slot, job.pos, job.tokens[:chunk], 0))
                    job.pos += chunk
                    job.tokens = job.tokens[chunk:]
        return items, done

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._calls and not self._stopped:
                    self._cv.wait()
                calls = list(self._calls)
                self._calls.clear()
            for fn, fut, loop in calls:
                try:
                    loop.call_soon_threadsafe(_set_result, fut, fn())
                except Exception as e:
                    loop.call_soon_threadsafe(_set_exception, fut, e)
            with self._cv:
                if not self._queue and not self._stopped:
                    continue
                self._gather()
                if self._stopped:
                    return
                if self._calls:  # a call came in while waiting: it must run before this pass
                    continue
                items, done = self._take()
            if not items:
                continue
            t0 = time.perf_counter()
            try:
                results = self.backend.forward(items)
            except Exception as e:  # answer every waiting round, keep the worker alive
                for job in done:
                    job.loop.call_soon_threadsafe(_set_exception, job.future, e)
                # a split job whose chunk failed cannot continue either
                with self._cv:
                    failed = {it.slot for it in items}
                    for job in [j for j in self._queue if j.slot in failed]:
                        self._queue.remove(job)
                        job.loop.call_soon_threadsafe(_set_exception, job.future, e)
                continue
            dt = time.perf_counter() - t0
            n = sum(len(it.tokens) for it in items)
            self.stats.forward_passes += 1
            self.stats.positions += n
            self.stats.busy_s += dt
            if all(it.n_logits == len(it.tokens) for it in items):  # rounds only: no prefill
                self.stats.recent.append((n, dt, len(done)))
                self.stats.round_passes += 1
            self.stats.batch_sizes[n] += 1
            # ``done`` jobs are the leading items; a trailing split chunk has no result to deliver.
            for job, logits in zip(done, results):
                job.loop.call_soon_threadsafe(_set_result, job.future, logits)


def _set_result(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)

