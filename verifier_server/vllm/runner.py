"""The vLLM runner: a round is one request to vLLM's async engine, scored over its prefix cache.

A round of session ``key`` sends the committed ids plus the candidates as one prompt with
``max_tokens=1`` and asks for the top-K log-probabilities of the rows that matter: the prompt rows
at the candidates (``prompt_logprobs``) and the row after the last candidate (the one generated
token's ``logprobs``). Everything else is vLLM's: paged KV, continuous batching of the rounds of
every device (and of plain requests) into shared steps, prefix caching (a round re-reads the
committed prefix from the cache and computes only its new positions), tensor and pipeline
parallelism. Nothing is held per session: a session is its ids, and a released one is simply not
asked for again (its blocks age out of the cache).

Two details keep it exact:
- vLLM returns junk prompt rows for positions it read from the prefix cache. A round needs the
  rows from the last committed id on, so a request whose cached span reaches into them (a repeat
  of the same round, in whole blocks) is sent again without reading the cache.
- Rules say what rows they need (``AcceptanceRule.needs``). Greedy and seeded SLEM work from top-K
  rows (SLEM certifies its draw, see ``shared.sampling``); when a certificate fails the round is
  scored again with full rows. TLI needs full rows in every round, which costs a full-vocabulary
  transfer per position: served only with ``full_rows``.

vLLM's asyncio objects live on a loop of their own, in a thread: the engine starts before the
server's loop exists, and its output handling (log-probabilities in Python) stays off the loop
that answers devices.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from verifier_server.acceptance import AcceptanceRule, RowKind, TopRow, Uncertified
from verifier_server.cost_curve import CostCurve, PassRecord, RoundCost, marginal_cost
from verifier_server.runner import RoundOutcome, RunnerError, TargetTokenizer
from verifier_server.vllm.options import VllmOptions

T = TypeVar("T")
CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32)
_FILLER = b"def add(a, b):\n    return a + b\n\n"


class _ReadRows:
    """A round's rows as a rule reads them, noting the last row read: rules read rows in order
    and stop at the first that settles the round, so when one raises ``Uncertified`` it is that
    row's certificate that failed, and only that row needs fetching whole."""

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows
        self.last = -1

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        self.last = i
        return self.rows[i]


@dataclass(frozen=True)
class _Scored:
    rows: list[Any]  # TopRow, or a dense np.ndarray for full rows
    cached: int  # prompt tokens read from the prefix cache
    queue_s: float
    model_s: float


class VllmRunner:
    name = "vllm"

    def __init__(self, options: VllmOptions, tokenizer: TargetTokenizer, model_name: str,
                 top_k: int = 20, full_rows: bool = False) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.sequence_slots = options.max_num_seqs
        self.max_context_tokens = options.max_model_len
        self.max_parked_bytes = 0  # vLLM's prefix cache holds idle sessions' state, evicting LRU blocks
        self.top_k = top_k
        self.row_kinds = frozenset({RowKind.TOP, RowKind.FULL} if full_rows else {RowKind.TOP})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        self._ids = itertools.count()
        self._active = 1
        self._mean_positions = 1.0
        self.counters = {
            "rounds": 0,
            "positions": 0,  # prompt positions vLLM computed for rounds (cache hits excluded)
            "cached_tokens": 0,  # prompt positions rounds read from the prefix cache
            "rounds_read_cache": 0,
            "cache_resends": 0,  # rounds whose cache hit reached the rows they need: sent again
            "full_row_rounds": 0,  # rounds scored with whole-vocabulary rows
            "uncertified_rounds": 0,  # rounds where some row's top K could not settle the draw
            "uncertified_rows": 0,  # such rows: each fetched again whole
        }
        try:
            self._llm = self.call(self._start(options))
            self.curve = CostCurve(self.call(self._calibrate()))
        except BaseException:
            self.close()
            raise

    # --- the Runner interface -------------------------------------------------------------------
    async def prefill(self, key: str, ids: Sequence[int]) -> None:
        """Put the prompt in the prefix cache, so that the first round computes its draft only."""
        await self._on_vllm(self._generate(list(ids), None, use_cache=True, prompt_rows=False))

    async def verify(
        self, key: str, ids: Sequence[int], candidates: Sequence[int], rule: AcceptanceRule
    ) -> RoundOutcome:
        cands = list(candidates)
        tokens = list(ids) + cands
        first = len(ids)  # rows from here on: at the candidates, then after the last one
        full = rule.needs is RowKind.FULL
        if full and RowKind.FULL not in self.row_kinds:
            raise RunnerError(f"rule '{rule.name}' needs full-vocabulary rows, which this runner does not serve")
        scored = await self._on_vllm(self._score(tokens, first, full))
        rows, rule_s, uncertified = _ReadRows(scored.rows), 0.0, 0
        while True:
            t0 = time.perf_counter()
            try:
                acceptance = await asyncio.to_thread(rule.accept, cands, rows)
            except Uncertified:  # that row's top K cannot settle the draw: fetch it whole, go again
                rule_s += time.perf_counter() - t0
                uncertified += 1
                rows.rows[rows.last] = await self._on_vllm(self.next_row(tokens[: first + rows.last], full=True))
                continue
            rule_s += time.perf_counter() - t0
            break
        self.counters["uncertified_rows"] += uncertified
        self.counters["uncertified_rounds"] += uncertified > 0
        self._count(len(tokens), scored)
        return RoundOutcome(acceptance.accepted, acceptance.token, scored.queue_s, scored.model_s, rule_s)

    def release(self, key: str) -> None:
        """Nothing is held per session: its cached blocks age out of vLLM's prefix cache."""

    def expect_rounds(self, n: int) -> None:
        self._active = max(n, 1)

    def round_cost(self) -> RoundCost:
        """The start-up curve priced at the current load: the other active sessions' rounds share
        vLLM's steps, each bringing about the mean round's positions."""
        return marginal_cost(self.curve, (self._active - 1) * self._mean_positions)

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "cost_curve_s": self.curve.as_dict(), "top_k": self.top_k}

    def add_pass_listener(self, listener: Callable[[PassRecord], None]) -> None:
        """vLLM's steps run inside its engine core, out of sight: its own metrics cover them."""

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            self._loop.call_soon_threadsafe(llm.shutdown)
            self._llm = None  # shut down here, not again by its finalizer at interpreter exit
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    # --- vLLM's loop ----------------------------------------------------------------------------
    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on vLLM's loop and wait for it (start-up, the plain reference)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _on_vllm(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on vLLM's loop; cancelling the round cancels it there (vLLM aborts the
        request), and an engine failure is a ``RunnerError``: the round committed nothing."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except (RunnerError, Uncertified):
            raise
        except Exception as e:
            raise RunnerError(f"vLLM failed the round: {e}") from e

    async def _start(self, options: VllmOptions) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(options.engine_args())

    async def _generate(self, tokens: list[int], logprobs: int | None, use_cache: bool,
                        prompt_rows: bool = True) -> Any:
        """One request of ``tokens`` generating one token; ``logprobs``: rows of that many best ids
        (-1: whole rows; None: no rows) for the generated token and, with ``prompt_rows``, for
        every prompt position too (callers never ask that with whole rows: a whole vocabulary per
        prompt position runs to gigabytes of Python objects on a long prompt)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, flat_logprobs=True,
                                prompt_logprobs=logprobs if prompt_rows else None, logprobs=logprobs,
                                skip_reading_prefix_cache=not use_cache)
        final = None
        async for out in self._llm.generate(TokensPrompt(prompt_token_ids=tokens), params,
                                            request_id=f"sled-{next(self._ids)}-{uuid.uuid4().hex[:8]}"):
            final = out
        if final is None:
            raise RunnerError("vLLM answered the round with nothing")
        return final

    async def _score(self, tokens: list[int], first: int, full: bool) -> _Scored:
        """Rows ``first`` .. ``len(tokens)`` of ``tokens``: top-K rows from one request over the
        prefix cache (sent again without it if the cached span covers a row we need), or whole
        rows from one request per row, each the generated token's row after a prefix (vLLM
        batches them; a prompt row of the whole vocabulary would come for every prompt position)."""
        t0 = time.perf_counter()
        if full:
            outs = await asyncio.gather(*(self._generate(tokens[: i + 1], -1, use_cache=True, prompt_rows=False)
                                          for i in range(first - 1, len(tokens))))
            rows: list[Any] = [_row(out.outputs[0].logprobs, 0, self.tokenizer.n_vocab, -1) for out in outs]
            return _Scored(rows, outs[0].num_cached_tokens or 0, 0.0, time.perf_counter() - t0)
        out = await self._generate(tokens, self.top_k, use_cache=True)
        cached = out.num_cached_tokens or 0
        if cached > first - 1:  # row ``first`` comes from position first - 1: it must be computed
            self.counters["cache_resends"] += 1
            out = await self._generate(tokens, self.top_k, use_cache=False)
            cached = 0
        elapsed = time.perf_counter() - t0
        queue_s = _queue_seconds(out)
        n_vocab = self.tokenizer.n_vocab
        rows = [_row(out.prompt_logprobs, i, n_vocab, self.top_k) for i in range(first, len(tokens))]
        rows.append(_row(out.outputs[0].logprobs, 0, n_vocab, self.top_k))
        return _Scored(rows, cached, queue_s, max(elapsed - queue_s, 0.0))

    async def next_row(self, tokens: list[int], full: bool) -> Any:
        """The row after ``tokens`` alone (plain decoding: the reference)."""
        return (await self._score(tokens, len(tokens), full)).rows[-1]

    async def _calibrate(self) -> dict[int, float]:
        """t(B): seconds of a round of B new positions after a cached prefix, for the draft hint."""
        filler = self.tokenizer.encode(_FILLER * 24)
        base = filler[:64]
        await self._generate(base, None, use_cache=True, prompt_rows=False)  # warm-up, and the cached prefix
        points = {}
        for b in CALIBRATION_SIZES:
            t0 = time.perf_counter()
            await self._generate(base + filler[64: 64 + b], self.top_k, use_cache=True)
            points[b] = time.perf_counter() - t0
        return points

    def _count(self, n_tokens: int, scored: _Scored) -> None:
        c = self.counters
        c["rounds"] += 1
        c["cached_tokens"] += scored.cached
        c["rounds_read_cache"] += scored.cached > 0
        c["positions"] += n_tokens - scored.cached
        c["full_row_rounds"] += isinstance(scored.rows[0], np.ndarray)
        self._mean_positions += 0.05 * (n_tokens - scored.cached - self._mean_positions)


def _row(flat: Any, i: int, n_vocab: int, k: int) -> TopRow | np.ndarray:
    """Row ``i`` of vLLM's flat log-probabilities: the ``k`` best ids (the prompt token's own
    entry, which vLLM adds whatever its rank, is left out unless it ranks among them), or with
    ``k`` -1 the whole row as a dense array."""
    lo, hi = flat.start_indices[i], flat.end_indices[i]
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64)
    logprobs = np.asarray(flat.logprobs[lo:hi], dtype=np.float64)
    if k < 0:
        dense = np.full(n_vocab, -np.inf)
        dense[ids] = logprobs
        return dense
    ranks = np.asarray([r if r is not None else n_vocab for r in flat.ranks[lo:hi]])
    keep = ranks <= k
    ids, logprobs = ids[keep], logprobs[keep]
    ids, first = np.unique(ids, return_index=True)  # the prompt token may be listed twice
    logprobs = logprobs[first]
    order = np.argsort(-logprobs, kind="stable")
    return TopRow(ids[order], logprobs[order], n_vocab)


def _queue_seconds(out: Any) -> float:
    """Seconds the request waited before vLLM scheduled it, where vLLM reports it."""
    m = getattr(out, "metrics", None)
    arrived, scheduled = getattr(m, "queued_ts", 0.0), getattr(m, "scheduled_ts", 0.0)
    return max(scheduled - arrived, 0.0) if arrived and scheduled else 0.0
