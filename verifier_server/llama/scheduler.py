"""Batches the forward work of all sessions into shared forward passes.

Verify rounds and prompt prefills from every session queue here; one worker thread owns the
backend and repeatedly takes what is waiting (after a short window that lets concurrent rounds
meet), up to a token budget, and runs it as one forward pass. Long prefills are split into chunks
so that they never stall other rounds for more than one budget's worth of tokens. Each job's
``reduce`` (an acceptance rule) runs on the worker right after its pass, where the logits are, so
only its small result crosses to the event loop.

The hand-over between the event loop and the worker is explicit: everything they share sits
behind one condition variable, and the worker never dies of one bad pass or of a closed event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from verifier_server.acceptance import LogitRows
from verifier_server.cost_curve import PassRecord
from verifier_server.llama.forward import ForwardBackend, ForwardItem
from verifier_server.runner import RunnerError

log = logging.getLogger(__name__)

# The longest a pass waits for expected rounds, as a share of a recent pass (measured: 0.5 batched
# four staggered devices into fuller passes, raising throughput and lowering latency on a CPU).
WAIT_FRACTION = 0.5
# Recent round-only passes kept for the wait window and handed to the cost model.
RECENT_PASSES = 256

Reduce = Callable[[LogitRows], Any]


@dataclass(frozen=True)
class Done:
    """What a job delivers: its reduced logits and where its time went."""

    value: Any
    queue_s: float  # from submission to the start of its (last) pass
    model_s: float  # the forward pass
    reduce_s: float = 0.0  # the job's reduce (an acceptance rule) after the pass


@dataclass(eq=False)
class Job:
    slot: int
    pos: int
    tokens: list[int]
    n_logits: int
    reduce: Reduce | None  # runs on the worker after the pass; None: no result but completion
    future: asyncio.Future[Done]
    loop: asyncio.AbstractEventLoop
    submitted: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class PassStats:
    """A consistent copy of the scheduler's counters."""

    forward_passes: int
    positions: int
    busy_s: float
    batch_sizes: dict[int, int]  # tokens in a pass -> passes (replayed by the benchmark)
    queued_jobs: int  # waiting for a pass now


class Scheduler:
    def __init__(self, backend: ForwardBackend, token_budget: int, wait_window_s: float = 0.002,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.token_budget = token_budget
        self.wait_window_s = wait_window_s
        self._clock = clock  # the wait window's; a test moves its own instead of waiting for real time
        self._cv = threading.Condition()
        # --- shared with the event loop: only under self._cv ---
        self._queue: deque[Job] = deque()
        # Work on the backend's memory (parking sessions), run between passes in submission order.
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self._expected_rounds = 1  # sessions generating now: rounds worth waiting for
        self._stopped = False
        self._forward_passes = 0
        self._positions = 0
        self._busy_s = 0.0
        self._batch_sizes: Counter[int] = Counter()
        self._recent: deque[PassRecord] = deque(maxlen=RECENT_PASSES)
        self._unread: deque[PassRecord] = deque(maxlen=RECENT_PASSES)  # not yet taken by take_passes
        # ---
        # Called on the worker thread after every pass (metrics); set before work arrives.
        self.pass_listeners: list[Callable[[PassRecord], None]] = []
        self._thread = threading.Thread(target=self._loop, name="sled-scheduler", daemon=True)
        self._thread.start()

    # --- the event loop's side ------------------------------------------------------------------
    def submit(self, slot: int, pos: int, tokens: list[int], n_logits: int, reduce: Reduce | None) -> Job:
        """Queue ``tokens`` for ``slot`` from ``pos`` on (discarding whatever the slot held there);
        the job's future gets ``reduce`` of the logits of the last ``n_logits`` of them."""
        if n_logits > self.token_budget:
            raise RunnerError(f"{n_logits} logit positions exceed the token budget {self.token_budget}")
        if not tokens:
            raise ValueError("a job needs at least one token")
        loop = asyncio.get_running_loop()
        job = Job(slot, pos, list(tokens), n_logits, reduce, loop.create_future(), loop)
        with self._cv:
            if self._stopped or not self._thread.is_alive():
                raise RunnerError("the model's scheduler has stopped")
            self._queue.append(job)
            self._cv.notify()
        return job

    def withdraw(self, job: Job) -> bool:
        """Take a job out of the queue if no pass has taken it whole yet (a chunk may have run);
        its future is cancelled. False if it is in a pass now: it will complete."""
        with self._cv:
            if job not in self._queue:
                return False
            self._queue.remove(job)
        job.future.cancel()
        return True

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run ``fn`` on the worker thread before the next pass. Queued at once: forward work
        submitted afterwards sees its effect (a slot saved before its new owner overwrites it)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            if self._stopped or not self._thread.is_alive():
                raise RunnerError("the model's scheduler has stopped")
            self._calls.append((fn, fut, loop))
            self._cv.notify()
        return fut

    def expect(self, rounds: int) -> None:
        """How many rounds to expect at once (the sessions generating now); wakes a waiting pass."""
        with self._cv:
            self._expected_rounds = max(rounds, 1)
            self._cv.notify()

    def stats(self) -> PassStats:
        with self._cv:
            return PassStats(self._forward_passes, self._positions, self._busy_s, dict(self._batch_sizes),
                             len(self._queue))

    def take_passes(self) -> list[PassRecord]:
        """Round-only passes finished since the last call (for the cost model)."""
        with self._cv:
            out = list(self._unread)
            self._unread.clear()
        return out

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # --- the worker's side ----------------------------------------------------------------------
    def _gather(self) -> None:
        """Let concurrent rounds meet (lock held, work queued): wait until every active session
        has its round queued, but no longer than the wait window or half of a recent pass,
        whichever is longer. On a slow server more rounds per pass are worth a short wait; on a
        fast one the wait stays within the configured window."""
        recent = list(self._recent)[-16:]
        mean_pass = sum(p.seconds for p in recent) / len(recent) if recent else 0.0
        deadline = self._clock() + max(self.wait_window_s, WAIT_FRACTION * mean_pass)
        while not self._stopped and not self._calls and len(self._queue) < self._expected_rounds:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            self._cv.wait(remaining)

    def _take(self) -> tuple[list[ForwardItem], list[Job]]:
        """Pop work up to the token budget (lock held): first every job that fits whole (verify
        rounds, in arrival order), then the oldest job left, whole or as a chunk (a long prefill,
        whose remainder stays queued). Rounds never wait behind a long prompt, and a quarter of
        the pass is kept for a waiting prefill so that heavy round traffic cannot starve it either.
        A pass never holds two jobs of one slot: a second one waits for the next pass."""
        items: list[ForwardItem] = []
        done: list[Job] = []
        slots: set[int] = set()
        budget = self.token_budget
        reserve = budget // 4 if any(len(j.tokens) > budget for j in self._queue) else 0

        def take_whole(job: Job) -> None:
            nonlocal budget
            self._queue.remove(job)
            items.append(ForwardItem(job.slot, job.pos, job.tokens, job.n_logits))
            done.append(job)
            slots.add(job.slot)
            budget -= len(job.tokens)

        for job in list(self._queue):
            if job.slot not in slots and len(job.tokens) <= budget - reserve:
                take_whole(job)
        rest = next((j for j in self._queue if j.slot not in slots), None)
        if rest is not None:
            if len(rest.tokens) <= budget:
                take_whole(rest)
            else:  # a chunk needs no logits; the logit positions stay with the remainder
                chunk = min(budget, len(rest.tokens) - rest.n_logits)
                if chunk > 0:
                    items.append(ForwardItem(rest.slot, rest.pos, rest.tokens[:chunk], 0))
                    rest.pos += chunk
                    rest.tokens = rest.tokens[chunk:]
        return items, done

    def _loop(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception:  # a defect in the scheduler itself: log it and keep serving
                log.exception("scheduler step failed")
                time.sleep(0.01)

    def _step(self) -> bool:
        """Run pending calls, then one pass. False once stopped."""
        with self._cv:
            while not self._queue and not self._calls and not self._stopped:
                self._cv.wait()
            if self._stopped:
                return False
            calls = list(self._calls)
            self._calls.clear()
        for fn, fut, loop in calls:
            try:
                _deliver(loop, fut, fn())
            except Exception as e:
                _deliver(loop, fut, error=e)
        with self._cv:
            if not self._queue:
                return True
            self._gather()
            if self._stopped:
                return False
            if self._calls:  # a call came in while waiting: it must run before this pass
                return True
            items, done = self._take()
        if items:
            self._run(items, done)
        return True

    def _run(self, items: list[ForwardItem], done: list[Job]) -> None:
        t0 = time.perf_counter()
        try:
            results = self.backend.forward(items)
        except Exception as e:  # answer every round of the pass; the worker carries on
            error = RunnerError(f"forward pass failed: {e}")
            with self._cv:  # a split job whose chunk failed cannot continue either
                failed = {it.slot for it in items}
                broken = [j for j in self._queue if j.slot in failed]
                for job in broken:
                    self._queue.remove(job)
            for job in done + broken:
                _deliver(job.loop, job.future, error=error)
            return
        dt = time.perf_counter() - t0
        # ``done`` jobs are the leading items; a trailing split chunk has no result to deliver.
        for job, rows in zip(done, results):
            t_reduce = time.perf_counter()
            try:
                value = job.reduce(rows) if job.reduce is not None else None
            except Exception as e:
                _deliver(job.loop, job.future, error=RunnerError(f"acceptance failed: {e}"))
                continue
            _deliver(job.loop, job.future, Done(value, t0 - job.submitted, dt, time.perf_counter() - t_reduce))
        n = sum(len(it.tokens) for it in items)
        with self._cv:
            self._forward_passes += 1
            self._positions += n
            self._busy_s += dt
            self._batch_sizes[n] += 1
            if all(it.n_logits == len(it.tokens) for it in items):  # rounds only: no prefill
                record = PassRecord(n, dt, len(done))
                self._recent.append(record)
                self._unread.append(record)
        for listener in self.pass_listeners:
            listener(PassRecord(n, dt, len(items)))


def _deliver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value: Any = None,
             error: BaseException | None = None) -> None:
    """Resolve ``fut`` on its event loop; a loop that has closed meanwhile is not an error."""
    def resolve() -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for this answer any more
        loop.call_soon_threadsafe(resolve)
