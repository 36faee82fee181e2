"""Running the app under uvicorn, with a drain on SIGTERM.

A rolling restart sends SIGTERM. The replica then drains instead of dropping its connections:
``/readyz`` turns 503 at once (a load balancer stops sending it new sessions), new sessions get
503 with ``Retry-After`` (nginx passes session creation on to another replica), idle sessions are
released, and each busy one once its round in flight has answered; its device gets 404 on the
next round and resumes the session elsewhere from its ids (exact: nothing lost or repeated). The
process keeps answering for at least the linger (so a load balancer or orchestrator that polls
``/readyz`` sees the 503 before the port closes, and a device's next request gets a clear 503 or
404 rather than a refused connection), then exits when no round is in flight, or after the grace
period at the latest. A second
SIGTERM, or SIGINT, skips the rest of the drain (uvicorn's own shutdown).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
from collections.abc import Generator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from verifier_server.engine import Engine
from verifier_server.metrics import metrics_app

log = logging.getLogger("sled.verifier")
POLL_S = 0.05


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float, linger_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self.linger_s = min(linger_s, grace_s)
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.engine.draining:
            super().handle_exit(sig, frame)
            return
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        t0 = time.monotonic()
        sessions = len(self.engine.sessions)
        self.engine.drain()
        log.warning("SIGTERM: draining (%d sessions; grace %.0f s)", sessions, self.grace_s)
        while time.monotonic() - t0 < self.grace_s and (
                self.engine.rounds_in_flight() or time.monotonic() - t0 < self.linger_s):
            await asyncio.sleep(POLL_S)
        left = self.engine.rounds_in_flight()
        log.warning("drained in %.2f s%s; exiting", time.monotonic() - t0,
                    f" ({left} rounds still in flight at the grace period's end)" if left else "")
        self.should_exit = True


class _MetricsServer(uvicorn.Server):
    """The operators' ``/metrics`` listener, beside the API's: it leaves the signals to the API's
    server (which drains on SIGTERM) and exits when that one does."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def serve(app: FastAPI, engine: Engine, host: str, port: int, drain_grace_s: float, drain_linger_s: float,
          metrics: tuple[str, int] | None = None) -> None:
    """Serve ``app``; with ``metrics`` (host, port), also ``/metrics`` there (``metrics_app``)."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=max(math.ceil(drain_grace_s), 1))
    server = DrainingServer(config, engine, drain_grace_s, drain_linger_s)
    if metrics is None:
        server.run()
        return
    scraper = _MetricsServer(uvicorn.Config(metrics_app(app.state.metrics), host=metrics[0], port=metrics[1],
                                            log_level="warning", access_log=False))

    async def both() -> None:
        listening = asyncio.ensure_future(scraper.serve())
        try:
            await server.serve()
        finally:
            scraper.should_exit = True
            await listening

    asyncio.run(both())
