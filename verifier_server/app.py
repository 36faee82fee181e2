"""HTTP routes of the verifier: a thin layer that authenticates the device, decodes bodies, calls
the engine and encodes answers; plus the operator's endpoints (``/healthz``, ``/readyz``,
``/metrics``) and one structured access-log line per request.

Bodies are msgpack when the request says ``application/msgpack`` (answers follow the request's
Content-Type, or its Accept header), JSON otherwise. Every error is a JSON-or-msgpack
``ErrorResponse`` with a message that says what is wrong; refusals that can pass (429, 503) carry
``Retry-After``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

from shared.codec import JSON, MSGPACK, DecodeError, decode, encode, wants_msgpack
from shared.fleet import DeviceLimits
from shared.http_body import BodyTooLarge, read_body
from shared.protocol import API_PREFIX, ErrorBody, ErrorResponse, SessionCreate, VerifyRequest
from verifier_server.auth import Credentials, RoundLimiter, metrics_label
from verifier_server.engine import Engine, EngineError, LimitExceeded
from verifier_server.metrics import Metrics
from verifier_server.runner import RunnerError

M = TypeVar("M", bound=BaseModel)
access_log = logging.getLogger("sled.access")


class Unauthorized(EngineError):
    status, code = 401, "unauthorized"


def _as_msgpack(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    if "msgpack" in accept:
        return True
    if "json" in accept:
        return False
    return wants_msgpack(request.headers.get("content-type"))


def _reply(request: Request, message: BaseModel, status: int = 200) -> Response:
    packed = _as_msgpack(request)
    return Response(encode(message, packed), status_code=status, media_type=MSGPACK if packed else JSON)


def _error(request: Request, status: int, code: str, message: str, retry_after: float | None = None) -> Response:
    response = _reply(request, ErrorResponse(error=ErrorBody(code=code, message=message)), status)
    if retry_after is not None:  # whole seconds (RFC 9110), at least one
        response.headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    if status == 401:
        response.headers["www-authenticate"] = 'Bearer realm="sled"'
    return response


async def _body(request: Request, model: type[M], limit: int) -> M:
    return decode(await read_body(request, limit), request.headers.get("content-type"), model)


class AccessLog:
    """ASGI middleware: one JSON line per request on the ``sled.access`` logger (device, session,
    round, status, latency) and the request counter by route template and status. Pure ASGI, so a
    verify round pays no extra task or body copy."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def record_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, str(status)).inc()
            if access_log.isEnabledFor(logging.INFO):
                state = scope.get("state") or {}
                access_log.info(json.dumps({
                    "ts": round(time.time(), 3),
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round((time.perf_counter() - t0) * 1e3, 2),
                    "device": state.get("device"),
                    "session": (scope.get("path_params") or {}).get("session_id"),
                    "round": state.get("round"),
                }))


def _openapi_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Document the request bodies the routes decode themselves (JSON or msgpack), so that the
    OpenAPI document (and the fuzzer that reads it) knows them."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for path, model in bodies.items():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
                doc["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
                    JSON: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                    MSGPACK: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
                }}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    engine: Engine,
    credentials: Credentials | None = None,
    limits: DeviceLimits | None = None,
    expire_every_s: float = 30.0,
    serve_metrics: bool = True,
) -> FastAPI:
    """The verifier's app over ``engine``. Without ``credentials`` every caller is an anonymous
    device keyed by its address (a lab); ``limits`` are per device (rounds per second here,
    sessions in the engine). ``serve_metrics`` False leaves ``/metrics`` to an operator-only
    listener (``metrics_app`` over ``app.state.metrics``)."""
    credentials = credentials or Credentials.none()
    limiter = RoundLimiter(limits or DeviceLimits(rounds_per_s=0))
    metrics = Metrics(engine.stats)
    engine.round_listeners.append(metrics.observe_round)
    engine.runner.add_pass_listener(metrics.observe_pass)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def expire() -> None:
            while True:
                await asyncio.sleep(expire_every_s)
                engine.expire_idle()

        task = asyncio.create_task(expire())
        yield
        task.cancel()

    app = FastAPI(title="sled verifier", version=str(engine.info().protocol_version), lifespan=lifespan)
    app.add_middleware(AccessLog, metrics=metrics)
    body_limit = (1 << 20) + 2 * engine.config.max_draft_bytes  # prompts up to ~1 MiB, drafts

    def device_of(request: Request) -> str:
        address = request.client.host if request.client else None
        device = credentials.identify(request.headers.get("authorization"), address)
        if device is None:
            raise Unauthorized("a valid device token is required: 'Authorization: Bearer <token>'")
        request.state.device = device
        return device

    @app.exception_handler(DecodeError)
    async def _bad_body(request: Request, exc: DecodeError) -> Response:
        return _error(request, 400, "bad_request", str(exc))

    def take_round(device: str, what: str) -> None:
        """A per-device token bucket paces rounds and session creations alike (a creation
        tokenizes and prefills the prompt: it costs more than a round, never less)."""
        wait = limiter.take(device)
        if wait > 0:
            raise LimitExceeded(f"device '{device}' exceeds its {limiter.limits.rounds_per_s:g} rounds per second "
                                f"({what})", retry_after=wait)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> Response:
        return _error(request, 413, "too_large", str(exc))

    @app.exception_handler(EngineError)
    async def _refused(request: Request, exc: EngineError) -> Response:
        if exc.status == 429:
            metrics.rate_limited.labels(metrics_label(getattr(request.state, "device", "unknown"))).inc()
        return _error(request, exc.status, exc.code, exc.message, exc.retry_after)

    @app.exception_handler(RunnerError)
    async def _runner(request: Request, exc: RunnerError) -> Response:
        return _error(request, 503, "backend_error", f"{exc}; retry the round", retry_after=1.0)

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process serves HTTP."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        """Readiness: the model is loaded (the app exists only then) and the replica is not draining."""
        if engine.draining:
            return _error(request, 503, "draining", "this replica is draining before a restart", retry_after=1.0)
        return Response(b'{"status":"ready"}', media_type=JSON)

    if serve_metrics:
        app.get("/metrics")(metrics.endpoint)
    app.state.metrics = metrics

    @app.get(f"{API_PREFIX}/health")
    async def health() -> dict:
        return {"status": "ok", "sessions": len(engine.sessions), "draining": engine.draining}

    @app.get(f"{API_PREFIX}/info")
    async def info(request: Request) -> Response:
        device_of(request)
        return _reply(request, engine.info())

    @app.get(f"{API_PREFIX}/vocab")
    async def vocab(request: Request) -> Response:
        """The target's pieces (for TLI); cacheable: the ETag is the vocabulary's content hash."""
        device_of(request)
        etag = f'"{engine.vocabulary.hash}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"etag": etag})
        response = _reply(request, engine.vocabulary)
        response.headers["etag"] = etag
        response.headers["cache-control"] = "private, max-age=86400"
        return response

    @app.get(f"{API_PREFIX}/stats")
    async def stats(request: Request) -> dict:
        """Counters for operators and the benchmark; a token is needed as for the devices' routes
        (give an operator a token of its own), unless authentication is off."""
        device_of(request)
        return engine.stats()

    @app.post(f"{API_PREFIX}/sessions")
    async def create_session(request: Request) -> Response:
        device = device_of(request)
        req = await _body(request, SessionCreate, body_limit)
        take_round(device, "a session creation counts as a round")
        return _reply(request, await engine.create(req, device), 201)

    @app.post(f"{API_PREFIX}/sessions/{{session_id}}/verify")
    async def verify(session_id: str, request: Request) -> Response:
        device = device_of(request)
        req = await _body(request, VerifyRequest, body_limit)
        request.state.round = req.round
        take_round(device, f"round {req.round}")
        return _reply(request, await engine.verify(session_id, req, device))

    @app.delete(f"{API_PREFIX}/sessions/{{session_id}}")
    async def delete_session(session_id: str, request: Request) -> Response:
        await engine.delete(session_id, device_of(request))
        return Response(status_code=204)

    _openapi_bodies(app, {f"{API_PREFIX}/sessions": SessionCreate,
                          f"{API_PREFIX}/sessions/{{session_id}}/verify": VerifyRequest})
    return app
