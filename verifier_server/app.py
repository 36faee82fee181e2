"""HTTP routes of the verifier: a thin layer that decodes bodies, calls the engine, encodes answers.

Bodies are msgpack when the request says ``application/msgpack`` (answers follow the request's
Content-Type, or its Accept header), JSON otherwise. Every error is a JSON-or-msgpack
``ErrorResponse`` with a message that says what is wrong.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

from shared.codec import JSON, MSGPACK, DecodeError, decode, encode, wants_msgpack
from shared.protocol import API_PREFIX, ErrorBody, ErrorResponse, SessionCreate, VerifyRequest
from verifier_server.engine import Engine, EngineError
from verifier_server.runner import RunnerError

M = TypeVar("M", bound=BaseModel)


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


def _error(request: Request, status: int, code: str, message: str) -> Response:
    return _reply(request, ErrorResponse(error=ErrorBody(code=code, message=message)), status)


async def _body(request: Request, model: type[M], limit: int) -> M:
    body = await request.body()
    if len(body) > limit:
        raise DecodeError(f"request body of {len(body)} bytes exceeds the limit of {limit}")
    return decode(body, request.headers.get("content-type"), model)


def create_app(engine: Engine, expire_every_s: float = 30.0) -> FastAPI:
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
    body_limit = (1 << 20) + 2 * engine.config.max_draft_bytes  # prompts up to ~1 MiB, drafts

    @app.exception_handler(DecodeError)
    async def _bad_body(request: Request, exc: DecodeError) -> Response:
        return _error(request, 400, "bad_request", str(exc))

    @app.exception_handler(EngineError)
    async def _refused(request: Request, exc: EngineError) -> Response:
        return _error(request, exc.status, exc.code, exc.message)

    @app.exception_handler(RunnerError)
    async def _runner(request: Request, exc: RunnerError) -> Response:
        return _error(request, 503, "backend_error", f"{exc}; retry the round")

    @app.get(f"{API_PREFIX}/health")
    async def health() -> dict:
        return {"status": "ok", "sessions": len(engine.sessions)}

    @app.get(f"{API_PREFIX}/info")
    async def info(request: Request) -> Response:
        return _reply(request, engine.info())

    @app.get(f"{API_PREFIX}/vocab")
    async def vocab(request: Request) -> Response:
        """The target's pieces (for TLI); cacheable: the ETag is the vocabulary's content hash."""
        etag = f'"{engine.vocabulary.hash}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"etag": etag})
        response = _reply(request, engine.vocabulary)
        response.headers["etag"] = etag
        response.headers["cache-control"] = "public, max-age=86400"
        return response

    @app.get(f"{API_PREFIX}/stats")
    async def stats() -> dict:
        return engine.stats()

    @app.post(f"{API_PREFIX}/sessions")
    async def create_session(request: Request) -> Response:
        req = await _body(request, SessionCreate, body_limit)
        return _reply(request, await engine.create(req), 201)

    @app.post(f"{API_PREFIX}/sessions/{{session_id}}/verify")
    async def verify(session_id: str, request: Request) -> Response:
        req = await _body(request, VerifyRequest, body_limit)
        return _reply(request, await engine.verify(session_id, req))

    @app.delete(f"{API_PREFIX}/sessions/{{session_id}}")
    async def delete_session(session_id: str) -> Response:
        await engine.delete(session_id)
        return Response(status_code=204)

    return app
