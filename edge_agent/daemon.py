"""``sled-agent serve``: the device daemon. Local apps speak the OpenAI API to it; it drafts with the
local model and verifies on the shared server.

Each generation runs the synchronous round loop (``Agent``) in a worker thread with a drafter of
its own, taken from a pool (the GGUF file is memory-mapped, so the weights are shared); at most
``concurrency`` generate at once, at most ``queue`` more wait, and beyond that a request gets a 429.
Streaming turns the committed text of each round into OpenAI chunks as it arrives.

A request whose client goes away cancels its generation: it stops before its next round and
deletes its verifier session, and its drafter returns to the pool only once the worker thread has
finished (a llama.cpp context must never be used by two threads). With an API key set, every
endpoint but ``/healthz`` wants it as OpenAI's ``Authorization: Bearer`` header.
"""
from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import json
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from edge_agent.agent import Agent, GenerationResult, SamplingMode, local_generate
from edge_agent.client import VerifierClient, VerifierError
from edge_agent.controller import DraftController
from edge_agent.drafter import Drafter
from edge_agent.drafting import DraftSource, gguf_drafter
from edge_agent.openai_api import ApiError, ChatRequest, CompletionRequest, Reply
from shared.fleet import DeviceSettings, Verifier
from shared.http_body import BodyTooLarge, read_body
from shared.protocol import ChatMessage, Limits, SamplingOptions

log = logging.getLogger("sled.agent")

# A request's body at most: a prompt the verifier takes (its limit is about 1 MiB) in JSON, which
# may escape it to twice its size. Read while it streams, so a larger body is never held whole.
MAX_BODY_BYTES = 2 << 20


@dataclass(frozen=True)
class DaemonConfig:
    verifier: Verifier  # replicas, timeout, retry policy (the fleet file's section)
    settings: DeviceSettings  # draft length, local API concurrency and queue, fallback
    model_name: str  # what /v1/models reports: the verifier's target
    max_tokens: int = 256  # when a request names no limit
    sampling_mode: SamplingMode = "auto"
    follow_hint: bool = True
    token: str | None = None  # this device's bearer token for the verifier
    adaptive: bool = False  # the device's draft controller (edge_agent.controller)
    pipelined: bool = False  # drafting while a round is in flight
    api_key: str | None = None  # local apps must send it (``Authorization: Bearer``); None: no check
    verifier_limits: Limits | None = None  # the verifier's /v1/info limits if known at start, else asked once


@dataclass(frozen=True)
class Job:
    """One generation as the round loop takes it. Built from the request before anything starts,
    so that every bad field is a 400 while a status can still be sent (a stream's is sent at once)."""

    prompt: str | None
    messages: list[ChatMessage] | None
    max_tokens: int
    stops: list[str]
    sampling: SamplingOptions


class Metrics:
    """The daemon's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sled_agent_requests_total", "Local API requests", ["endpoint", "status"],
                                registry=self.registry)
        self.tokens = Counter("sled_agent_completion_tokens_total", "Committed tokens returned", registry=self.registry)
        self.rounds = Counter("sled_agent_rounds_total", "Verify rounds", registry=self.registry)
        self.drafted = Counter("sled_agent_draft_tokens_total", "Drafter tokens sent", registry=self.registry)
        self.accepted = Counter("sled_agent_accepted_draft_tokens_total", "Drafter tokens accepted",
                                registry=self.registry)
        self.failovers = Counter("sled_agent_failovers_total", "Sessions moved to another replica",
                                 registry=self.registry)
        # Behind a load balancer the agent has one address: a lost replica shows as a session the
        # balancer's next replica does not know, re-created there from its committed ids.
        self.resumed = Counter("sled_agent_resumed_sessions_total",
                               "Sessions re-created from their committed ids (their replica lost or draining)",
                               registry=self.registry)
        self.round_trip = Histogram("sled_agent_round_seconds", "Verify round trip", registry=self.registry,
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def record(self, result: GenerationResult) -> None:
        self.tokens.inc(result.committed_tokens)
        self.rounds.inc(result.rounds)
        self.drafted.inc(result.draft_tokens)
        self.accepted.inc(result.accepted_draft_tokens)
        self.failovers.inc(result.failovers)
        self.resumed.inc(result.resumed)
        for seconds in result.round_latencies_s:
            self.round_trip.observe(seconds)


def no_verifier_answered(e: VerifierError) -> bool:
    """Whether the local fallback may answer: no verifier answered at all (unreachable, or a
    5xx). A verifier's 4xx (prompt too long, a bad token, over the device's limits) is the true
    answer, and drafter-only text in its place would hide it from the app."""
    return e.status == 0 or e.status >= 500


def _key_matches(request: Request, key: str) -> bool:
    """Whether the request carries ``key`` as ``Authorization: Bearer``; compared in constant
    time, so that the answer's timing tells nothing about the key."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone. The body has been read, so the next ASGI message is the
    disconnect (or the end of the exchange, once the answer is sent)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_daemon(config: DaemonConfig, drafters: list[Drafter | DraftSource | None]) -> FastAPI:
    """The app; ``drafters`` holds one drafter per concurrent generation (or None: no drafting)."""

    def authorize(request: Request) -> None:
        if config.api_key is not None and request.url.path != "/healthz" and not _key_matches(request, config.api_key):
            raise ApiError(401, "this daemon needs its API key, sent as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    app = FastAPI(title="sled agent", dependencies=[Depends(authorize)])
    metrics = Metrics()
    api, retry = config.settings.api, config.verifier.retry
    pool: asyncio.Queue[Drafter | DraftSource | None] = asyncio.Queue()
    for d in drafters[: api.concurrency]:
        pool.put_nowait(d)
    # One thread per pooled drafter: a generation holds both until its round loop has returned.
    workers = ThreadPoolExecutor(max_workers=max(pool.qsize(), 1), thread_name_prefix="sled-generate")
    waiting = 0
    # The draft controller of each pooled drafter (--adaptive): it measures the device, its link and
    # its drafter, so it is kept from one request to the next rather than learned anew each time.
    controllers: dict[int, DraftController] = {}
    # A generation fits the drafter's context (the fleet setting its drafters were loaded with) and
    # the verifier's; the verifier's is asked once, when the first request needs it.
    drafter_context = config.settings.context if any(gguf_drafter(d) for d in drafters) else None
    verifier_context = config.verifier_limits.max_context_tokens if config.verifier_limits else None

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        """The router's own refusals (an unknown path, a wrong method) in OpenAI's format too; not
        counted, since any path would become a metrics label."""
        return _error_response(ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        """Any other failure still answers in OpenAI's format (uvicorn logs the traceback)."""
        return await _api_error(request, ApiError.internal())

    def refuse_when_full() -> None:
        if pool.empty() and waiting >= api.queue:
            raise ApiError(429, f"{api.concurrency} generations running and {waiting} waiting: retry later",
                           kind="rate_limit_exceeded")

    async def take_drafter() -> Drafter | DraftSource | None:
        """A drafter for one generation; waits in the bounded queue, or refuses with a 429."""
        nonlocal waiting
        refuse_when_full()
        waiting += 1
        try:
            return await pool.get()
        finally:
            waiting -= 1

    @contextlib.asynccontextmanager
    async def generation(job: Job, on_text: Callable[[bytes], None] | None
                         ) -> AsyncIterator[asyncio.Future[GenerationResult]]:
        """One generation on a pooled drafter in a worker thread; yields its result to await.
        Leaving the block sets its cancel event, which stops a generation still running (its
        request went away) before its next round. The drafter goes back to the pool when the
        thread has finished, not when the block is left."""
        drafter = await take_drafter()
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        worker = workers.submit(generate, drafter, job, on_text, cancel)
        worker.add_done_callback(lambda _: loop.call_soon_threadsafe(pool.put_nowait, drafter))
        try:
            yield asyncio.wrap_future(worker, loop=loop)
        finally:
            cancel.set()

    def generate(drafter: Drafter | DraftSource | None, job: Job, on_text: Callable[[bytes], None] | None,
                 cancel: threading.Event) -> GenerationResult:
        # Sessions spread over the replicas; each fails over to the next one on its own.
        urls = config.verifier.urls
        with VerifierClient(urls, timeout_s=config.verifier.timeout_s, retries=retry.attempts, backoff_s=retry.backoff_s,
                            max_backoff_s=retry.max_backoff_s, start=random.randrange(len(urls)),
                            token=config.token) as client:
            agent = Agent(client, drafter, config.settings.max_draft_tokens, follow_hint=config.follow_hint,
                          sampling_mode=config.sampling_mode, deadline_s=retry.deadline_s,
                          adaptive=config.adaptive, pipelined=config.pipelined,
                          controller=controllers.get(id(drafter)))
            if agent.controller is not None:  # what it learned serves the drafter's next request
                controllers[id(drafter)] = agent.controller
            try:
                return agent.generate(job.prompt, job.messages, job.max_tokens, job.stops, on_text, job.sampling,
                                      cancel)
            except VerifierError as e:
                model = gguf_drafter(drafter)
                if not (config.settings.fallback == "local" and model is not None and no_verifier_answered(e)):
                    raise
        result = local_generate(model, job.prompt, job.messages, job.max_tokens, job.stops)
        if on_text is not None and result.text:
            on_text(result.text)
        return result

    def ask_verifier_context() -> int | None:
        """The verifier's context per session from its /v1/info (the first replica that answers);
        None while none does: then the verifier's own 413 is the limit."""
        with VerifierClient(config.verifier.urls, timeout_s=5, retries=0, token=config.token) as client:
            for _ in client.urls:
                try:
                    return client.info().limits.max_context_tokens
                except VerifierError:
                    client.failover()
        return None

    async def token_cap() -> int | None:
        nonlocal verifier_context
        if verifier_context is None:
            verifier_context = await asyncio.to_thread(ask_verifier_context)
        known = [c for c in (drafter_context, verifier_context) if c is not None]
        return min(known) if known else None

    async def serve(request: Request, model: type[ChatRequest] | type[CompletionRequest]) -> Response:
        """Every request is counted once by status: refusals by the ApiError handler, answers here
        or, for a stream, when it ends."""
        endpoint = request.url.path
        try:
            req = model.model_validate_json(await read_body(request, MAX_BODY_BYTES))
        except BodyTooLarge as e:
            raise ApiError(413, str(e)) from None
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or None
            raise ApiError(400, f"{field or 'body'}: {err['msg']}", field) from None
        req.check_supported()
        job = Job(*req.prompt_form(), req.limit(config.max_tokens, await token_cap()), req.stops(), req.sampling())
        reply = Reply(chat=model is ChatRequest, model=config.model_name)
        if req.stream:
            refuse_when_full()  # a 429 while a status can still be sent
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(job, reply, endpoint, include_usage), media_type="text/event-stream")
        async with generation(job, None) as work:
            gone = asyncio.ensure_future(_disconnected(request))
            racing: list[asyncio.Future[Any]] = [work, gone]
            try:
                await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if not work.done():  # nobody reads this answer; leaving the block cancels the generation
                raise ApiError(499, "the client closed the request", kind="client_closed")
            try:
                result = work.result()
            except VerifierError as e:
                raise ApiError.from_verifier(e) from None
        metrics.record(result)
        metrics.requests.labels(endpoint, "200").inc()
        headers = {"x-sled-fallback": "local"} if result.local_fallback else None
        return JSONResponse(reply.complete(result.text.decode(errors="replace"), result, result.prompt_tokens),
                            headers=headers)

    def stream_error(e: Exception) -> ApiError:
        """The error chunk for a failure once the status line has gone."""
        if isinstance(e, ApiError):
            return e
        if isinstance(e, VerifierError):
            return ApiError.from_verifier(e)
        log.error("a streamed generation failed", exc_info=e)
        return ApiError.internal()

    async def stream(job: Job, reply: Reply, endpoint: str, include_usage: bool) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        def on_text(piece: bytes) -> None:  # on the worker thread
            loop.call_soon_threadsafe(chunks.put_nowait, piece)

        try:
            async with generation(job, on_text) as work:
                yield _sse(reply.chunk(None, first=True))
                work.add_done_callback(lambda _: chunks.put_nowait(None))
                while (piece := await chunks.get()) is not None:
                    if text := decoder.decode(piece):
                        yield _sse(reply.chunk(text))
                result = await work
        except Exception as e:  # the status line has gone: the error is a chunk, and the stream ends
            error = stream_error(e)
            metrics.requests.labels(endpoint, str(error.status)).inc()
            yield _sse(error.body())
        else:
            metrics.record(result)
            metrics.requests.labels(endpoint, "200").inc()
            for chunk in reply.final_chunk(result, result.prompt_tokens, include_usage):
                yield _sse(chunk)
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, CompletionRequest)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0, "owned_by": "sled"}]}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "generating": api.concurrency - pool.qsize(), "waiting": waiting}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
