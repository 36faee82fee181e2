"""HTTP client for the verifier's protocol: msgpack bodies, timeouts, clear errors, safe retries,
and the replicas to fail over to.

Verify rounds are numbered and session creation carries an idempotency key, so retrying after a
dropped connection can never commit twice. The client retries transport failures and 5xx answers
with exponential backoff and jitter before giving up with a message that names the server; the
agent then moves the session to the next replica (``failover``) with ``resume_ids``.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import threading
import time
from collections.abc import Sequence
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
log = logging.getLogger("sled.agent")


class VerifierError(RuntimeError):
    """The verifier refused a request or could not be reached; ``status`` is 0 when unreachable."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# Answers worth retrying on the same replica: it may be restarting or overloaded for a moment,
# or this device is over its limits (429: after the server's Retry-After).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 30.0
# Deleting a session left on a replica failed over from: a quick try, never a wait on a dead host.
LEFT_BEHIND_TIMEOUT_S = 2.0


def is_loopback(url: str) -> bool:
    """Whether ``url`` names this machine (``localhost`` or a loopback address): traffic to it
    never crosses a network."""
    host = httpx.URL(url).host
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


_warned_cleartext: set[str] = set()
_warned_lock = threading.Lock()


def warn_cleartext_token(urls: Sequence[str]) -> None:
    """Warn, once per URL in this process, that a device token goes to it unencrypted: anyone on
    the network path can read it and act as this device. The daemon opens a client per request, so
    the warning comes once, when it starts (its first client), not with every generation."""
    exposed = [u for u in urls if httpx.URL(u).scheme == "http" and not is_loopback(u)]
    with _warned_lock:
        new = [u for u in exposed if u not in _warned_cleartext]
        _warned_cleartext.update(new)
    if new:
        log.warning("the device token is sent in clear text to %s: use https:// (TLS at the load "
                    "balancer, see deploy/README.md) for a verifier that is not on this machine", ", ".join(new))


class VerifierClient:
    """Talks to one replica at a time (``base_url``), out of ``urls``; ``failover`` moves on."""

    def __init__(
        self,
        urls: str | Sequence[str],
        timeout_s: float = 60.0,
        retries: int = 3,
        network_delay_s: float = 0.0,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        start: int = 0,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``transport`` carries every replica's requests instead of the network (a test's
        in-process verifiers, or a fault-injecting one)."""
        self.urls = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise ValueError("a verifier client needs at least one URL")
        if token:
            warn_cleartext_token(self.urls)
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        # Emulated extra round-trip time, for measuring a device on a slower network.
        self.network_delay_s = network_delay_s
        self._clients = [
            httpx.Client(
                base_url=url + API_PREFIX,
                timeout=httpx.Timeout(timeout_s, connect=5.0),
                headers={"content-type": MSGPACK, "accept": MSGPACK,
                         **({"authorization": f"Bearer {token}"} if token else {})},
                transport=transport,
            )
            for url in self.urls
        ]
        self.current = start % len(self.urls)
        self._left_behind: list[tuple[int, str]] = []  # (replica, session) failed over from
        self._capabilities: dict[int, frozenset[str]] = {}

    @property
    def base_url(self) -> str:
        return self.urls[self.current]

    @property
    def _http(self) -> httpx.Client:
        return self._clients[self.current]

    def failover(self, left_behind: str | None = None) -> str:
        """Move to the next replica (sessions are re-created there from their ids); its URL.
        ``left_behind``, the session the device held on the replica it leaves, is deleted there
        by ``delete_left_behind`` once that replica answers again."""
        if left_behind is not None:
            self._left_behind.append((self.current, left_behind))
        self.current = (self.current + 1) % len(self.urls)
        return self.base_url

    def delete_left_behind(self) -> None:
        """Best effort, without retries: delete the sessions left on replicas failed over from,
        so that a replica which comes back does not hold them (and count them against the
        device's cap) until they expire. One still unreachable keeps its sessions for a later
        call, or for its own expiry."""
        still = []
        for replica, session_id in self._left_behind:
            try:
                self._clients[replica].delete(f"/sessions/{session_id}", timeout=LEFT_BEHIND_TIMEOUT_S)
            except httpx.HTTPError:
                still.append((replica, session_id))
        self._left_behind = still

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def __enter__(self) -> VerifierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> ServerInfo:
        return self._call("GET", "/info", None, ServerInfo)

    def create_session(self, req: SessionCreate) -> SessionCreated:
        return self._call("POST", "/sessions", req, SessionCreated)

    def capabilities(self) -> frozenset[str]:
        """What the current replica supports (asked once per replica)."""
        if self.current not in self._capabilities:
            self._capabilities[self.current] = frozenset(self.info().capabilities)
        return self._capabilities[self.current]

    def verify(self, session_id: str, round_no: int, draft: bytes, draft_ids: list[int] | None = None,
               proposals: list[Proposal] | None = None, chained: int = 0) -> VerifyResponse:
        req = VerifyRequest(round=round_no, draft=draft, draft_ids=draft_ids, proposals=proposals, chained=chained)
        return self._call("POST", f"/sessions/{session_id}/verify", req, VerifyResponse)

    def vocabulary(self) -> Vocabulary:
        return self._call("GET", "/vocab", None, Vocabulary)

    def delete_session(self, session_id: str) -> None:
        with contextlib.suppress(httpx.HTTPError):  # best effort: the server expires idle sessions
            self._http.delete(f"/sessions/{session_id}")

    def _backoff(self, attempt: int, retry_after: str | None = None) -> None:
        """Exponential backoff with jitter, so that many devices do not retry in lockstep; at
        least the server's ``Retry-After`` when it gave one."""
        wait = min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.5)
        if retry_after is not None and retry_after.isdigit():
            wait = max(wait, min(float(retry_after), MAX_RETRY_AFTER_S))
        time.sleep(wait)

    def _call(self, method: str, path: str, body: BaseModel | None, model: type[M]) -> M:
        content = encode(body, as_msgpack=True) if body is not None else None
        for attempt in range(self.retries + 1):
            if self.network_delay_s:
                time.sleep(self.network_delay_s)
            try:
                r = self._http.request(method, path, content=content)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise VerifierError(f"cannot reach the verifier at {self.base_url}: {e}") from None
                self._backoff(attempt)
                continue
            if r.status_code not in RETRY_STATUSES or attempt == self.retries:
                break
            self._backoff(attempt, r.headers.get("retry-after"))
        ctype = r.headers.get("content-type")
        if r.status_code >= 400:
            try:
                err = decode(r.content, ctype, ErrorResponse).error
                raise VerifierError(f"verifier: {err.message}", r.status_code, err.code)
            except DecodeError:
                raise VerifierError(f"verifier answered HTTP {r.status_code}: {r.text[:200]}", r.status_code) from None
        return decode(r.content, ctype, model)
