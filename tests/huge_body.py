"""A client that streams a huge chunked body into an app through its ASGI interface, counting
what the app reads: an app that reads the body whole before checking its size reads it all."""
from __future__ import annotations

import asyncio
from typing import Any

CHUNK = 65536


def stream_into(app: Any, path: str, total: int = 50 << 20) -> tuple[int, bytes, int]:
    """POST ``total`` bytes (chunked, no Content-Length) to ``path``; the answer's status and body,
    and how many bytes the app took from the body before answering."""
    read: list[int] = []
    replies: list[dict] = []

    async def receive() -> dict:
        read.append(CHUNK)
        return {"type": "http.request", "body": b"x" * CHUNK, "more_body": sum(read) < total}

    async def send(message: dict) -> None:
        replies.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "http_version": "1.1", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in replies if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in replies if m["type"] == "http.response.body")
    return status, body, sum(read)
