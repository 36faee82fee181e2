"""HTTP client for the verifier's protocol: msgpack bodies, timeouts, clear errors, safe retries.

Verify rounds are numbered, so retrying a round after a dropped connection can never commit twice;
the client retries transport failures a few times before giving up with a message that names the
server.
"""
from __future__ import annotations

import contextlib
import time
from typing import TypeVar

import httpx
from pydantic import BaseModel

from shared.codec import MSGPACK, DecodeError, decode, encode
from shared.protocol import (
    API_PREFIX,
    ErrorResponse,
    Proposal,
    ServerInfo,
    SessionCreate,
    SessionCreated,
    VerifyRequest,
    VerifyResponse,
    Vocabulary,
)

M = TypeVar("M", bound=BaseModel)


class VerifierError(RuntimeError):
    """The verifier refused a request or could not be reached; ``status`` is 0 when unreachable."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class VerifierClient:
    def __init__(
        self,
        base_url: str,
        timeout_s: float = 60.0,
        retries: int = 3,
        network_delay_s: float = 0.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        # Emulated extra round-trip time, for measuring a device on a slower network.
        self.network_delay_s = network_delay_s
        self._http = httpx.Client(
            base_url=self.base_url + API_PREFIX,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            headers={"content-type": MSGPACK, "accept": MSGPACK},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VerifierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> ServerInfo:
        return self._call("GET", "/info", None, ServerInfo)

    def create_session(self, req: SessionCreate) -> SessionCreated:
        return self._call("POST", "/sessions", req, SessionCreated)

    def verify(self, session_id: str, round_no: int, draft: bytes, draft_ids: list[int] | None = None,
               proposals: list[Proposal] | None = None) -> VerifyResponse:
        req = VerifyRequest(round=round_no, draft=draft, draft_ids=draft_ids, proposals=proposals)
        return self._call("POST", f"/sessions/{session_id}/verify", req, VerifyResponse)

    def vocabulary(self) -> Vocabulary:
        return self._call("GET", "/vocab", None, Vocabulary)

    def delete_session(self, session_id: str) -> None:
        with contextlib.suppress(httpx.HTTPError):  # best effort: the server expires idle sessions
            self._http.delete(f"/sessions/{session_id}")

    def _call(self, method: str, path: str, body: BaseModel | None, model: type[M]) -> M:
        content = encode(body, as_msgpack=True) if body is not None else None
        for attempt in range(self.retries + 1):
            if self.network_delay_s:
                time.sleep(self.network_delay_s)
            try:
                r = self._http.request(method, path, content=content)
                break
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise VerifierError(f"cannot reach the verifier at {self.base_url}: {e}") from None
                time.sleep(0.2 * 2**attempt)
        ctype = r.headers.get("content-type")
        if r.status_code >= 400:
            try:
                err = decode(r.content, ctype, ErrorResponse).error
                raise VerifierError(f"verifier: {err.message}", r.status_code, err.code)
            except DecodeError:
                raise VerifierError(f"verifier answered HTTP {r.status_code}: {r.text[:200]}", r.status_code) from None
        return decode(r.content, ctype, model)
