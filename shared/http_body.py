"""Reading an HTTP request body under a size limit, for the verifier and the device daemon alike.

Starlette's ``Request.body()`` reads the whole body before anyone can look at its size, so a
client that streams 50 MB (chunked, with no ``Content-Length``) makes the server hold 50 MB. Here
a declared length over the limit is refused before reading, and a streamed body is refused as soon
as its running total passes the limit: the server never holds more than the limit.
"""
from __future__ import annotations

from starlette.requests import Request


class BodyTooLarge(ValueError):
    """The body exceeds the limit (an HTTP 413); the message says by how much."""


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {int(declared)} bytes exceeds the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
    return bytes(body)
