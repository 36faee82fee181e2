"""``sled-agent serve``: the device daemon. Local apps speak the OpenAI API to it; it drafts with the
local model and verifies on the shared server.

Each generation runs the synchronous round loop (``Agent``) in a worker thread with a drafter of
its own, taken from a pool (the GGUF file is memory-mapped, so the weights are shared); at most
``concurrency`` generate at once, at most ``queue`` more wait, and beyond that a request gets a 429.
Streaming turns the committed text of each round into OpenAI chunks as it arrives.
"""
from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import ValidationError

from edge_agent.agent import Agent, GenerationResult, SamplingMode, local_generate
from edge_agent.client import VerifierClient, VerifierError
from edge_agent.controller import DraftController
from edge_agent.drafter import Drafter
from edge_agent.drafting import DraftSource, gguf_drafter
from edge_agent.openai_api import ApiError, ChatRequest, CompletionRequest, Reply
from shared.fleet import DeviceSettings, Verifier


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
        self.round_trip = Histogram("sled_agent_round_seconds", "Verify round trip", registry=self.registry,
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))

    def record(self, result: GenerationResult) -> None:
        self.tokens.inc(result.committed_tokens)
        self.rounds.inc(result.rounds)
        self.drafted.inc(result.draft_tokens)
        self.accepted.inc(result.accepted_draft_tokens)
        self.failovers.inc(result.failovers)
        for seconds in result.round_latencies_s:
            self.round_trip.observe(seconds)


def create_daemon(config: DaemonConfig, drafters: list[Drafter | DraftSource | None]) -> FastAPI:
    """The app; ``drafters`` holds one drafter per concurrent generation (or None: no drafting)."""
    app = FastAPI(title="sled agent")
    metrics = Metrics()
    api, retry = config.settings.api, config.verifier.retry
    pool: asyncio.Queue[Drafter | DraftSource | None] = asyncio.Queue()
    for d in drafters[: api.concurrency]:
        pool.put_nowait(d)
    waiting = 0
    # The draft controller of each pooled drafter (--adaptive): it measures the device, its link and
    # its drafter, so it is kept from one request to the next rather than learned anew each time.
    controllers: dict[int, DraftController] = {}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    def refuse_when_full() -> None:
        if pool.empty() and waiting >= api.queue:
            raise ApiError(429, f"{api.concurrency} generations running and {waiting} waiting: retry later",
                           kind="rate_limit_exceeded")

    @contextlib.asynccontextmanager
    async def drafter_slot() -> AsyncIterator[Drafter | DraftSource | None]:
        """A drafter for one generation; waits in the bounded queue, or refuses with a 429."""
        nonlocal waiting
        refuse_when_full()
        waiting += 1
        try:
            drafter = await pool.get()
        finally:
            waiting -= 1
        try:
            yield drafter
        finally:
            pool.put_nowait(drafter)

    def generate(drafter: Drafter | DraftSource | None, req: ChatRequest | CompletionRequest,
                 on_text: Callable[[bytes], None] | None) -> GenerationResult:
        prompt, messages = (None, [m.plain() for m in req.messages]) if isinstance(req, ChatRequest) else (req.text(), None)
        limit = req.limit(config.max_tokens)
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
                return agent.generate(prompt, messages, limit, req.stops(), on_text, req.sampling())
            except VerifierError:
                model = gguf_drafter(drafter)
                if not (config.settings.fallback == "local" and model is not None):
                    raise
        result = local_generate(model, prompt, messages, limit, req.stops())
        if on_text is not None and result.text:
            on_text(result.text)
        return result

    async def serve(request: Request, model: type[ChatRequest] | type[CompletionRequest]) -> Response:
        """Every request is counted once by status: refusals by the ApiError handler, answers here
        or, for a stream, when it ends."""
        endpoint = request.url.path
        try:
            req = model.model_validate_json(await request.body())
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or None
            raise ApiError(400, f"{field or 'body'}: {err['msg']}", field) from None
        req.check_supported()
        req.sampling()  # a bad sampling value is a 400 before anything starts
        reply = Reply(chat=model is ChatRequest, model=config.model_name)
        if req.stream:
            refuse_when_full()  # a 429 while a status can still be sent
            return StreamingResponse(stream(req, reply, endpoint), media_type="text/event-stream")
        async with drafter_slot() as drafter:
            try:
                result = await asyncio.to_thread(generate, drafter, req, None)
            except VerifierError as e:
                raise ApiError.from_verifier(e) from None
        metrics.record(result)
        metrics.requests.labels(endpoint, "200").inc()
        headers = {"x-sled-fallback": "local"} if result.local_fallback else None
        return JSONResponse(reply.complete(result.text.decode(errors="replace"), result, result.prompt_tokens),
                            headers=headers)

    async def stream(req: ChatRequest | CompletionRequest, reply: Reply, endpoint: str) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        try:
            async with drafter_slot() as drafter:
                yield _sse(reply.chunk(None, first=True))
                def on_text(piece: bytes) -> None:  # on the worker thread
                    loop.call_soon_threadsafe(chunks.put_nowait, piece)

                work = asyncio.ensure_future(asyncio.to_thread(generate, drafter, req, on_text))
                work.add_done_callback(lambda _: chunks.put_nowait(None))
                while (piece := await chunks.get()) is not None:
                    if text := decoder.decode(piece):
                        yield _sse(reply.chunk(text))
                result = await work
        except (ApiError, VerifierError) as e:  # the status line has gone: the error is a chunk
            error = e if isinstance(e, ApiError) else ApiError.from_verifier(e)
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


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
