"""The verifier's Prometheus metrics, named as vLLM and llama.cpp name theirs (``sled:`` for
``vllm:``) so that existing speculative-decoding dashboards read them; ``deploy/grafana`` holds one.

Counters are fed as rounds and passes happen (the engine's round records, the runner's pass
records); gauges are read from the engine and runner at scrape time. Each app has its own
registry, so several verifiers in one process (tests) do not share counters. The ``device`` label
takes only authenticated device ids (the fleet's devices, or ``anonymous`` for every anonymous
caller): bounded cardinality.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from verifier_server.auth import metrics_label
from verifier_server.cost_curve import PassRecord
from verifier_server.engine import RoundRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_POSITIONS = 64  # per-position acceptance is counted up to here (drafts are capped far below)


class _Gauges(Collector):
    """Read at scrape time: what the engine and the runner hold now."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Any]:
        st = self.read()
        gauges = {
            "sled:sessions_active": ("Sessions open on this replica", st.get("sessions", 0)),
            "sled:sessions_parked": ("Sessions whose KV state is parked in host memory", st.get("parked_sessions", 0)),
            "sled:slots_in_use": ("KV sequence slots holding a session", st.get("slots_in_use", 0)),
            "sled:queue_depth": ("Jobs waiting for a forward pass", st.get("queued_jobs", 0)),
            "sled:draining": ("1 while the replica drains before exiting", int(st.get("draining", False))),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "sled:evictions": ("Sessions that lost their slot to another", st.get("evictions", 0)),
            "sled:rebuilds": ("Rounds that re-evaluated a session whose KV state was dropped", st.get("rebuilds", 0)),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, read_state: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.drafts = Counter("sled:spec_decode_num_drafts", "Verify rounds that carried a draft", registry=r)
        self.draft_tokens = Counter("sled:spec_decode_num_draft_tokens", "Draft tokens proposed (target tokens)",
                                    registry=r)
        self.accepted_tokens = Counter("sled:spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r)
        self.accepted_per_pos = Counter("sled:spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted, by position in the draft", ["position"], registry=r)
        self.rounds = Counter("sled:rounds", "Verify rounds by outcome", ["outcome"], registry=r)
        self.round_seconds = Histogram("sled:round_seconds", "Verify round time in the server", registry=r,
                                       buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))
        self.pass_rounds = Histogram("sled:forward_pass_batch_size", "Jobs (rounds, prefills) in a forward pass",
                                     registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.pass_tokens = Histogram("sled:forward_pass_tokens", "Token positions in a forward pass", registry=r,
                                     buckets=(1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048))
        self.pass_seconds = Histogram("sled:forward_pass_seconds", "Forward pass time", registry=r,
                                      buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.device_rounds = Counter("sled:device_rounds", "Verify rounds per device", ["device"], registry=r)
        self.device_draft = Counter("sled:device_draft_tokens", "Draft tokens per device", ["device"], registry=r)
        self.device_accepted = Counter("sled:device_accepted_tokens", "Accepted draft tokens per device", ["device"],
                                       registry=r)
        self.device_committed = Counter("sled:device_committed_tokens", "Committed tokens per device", ["device"],
                                        registry=r)
        self.requests = Counter("sled:http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.rate_limited = Counter("sled:rate_limited", "Requests refused by a per-device limit", ["device"],
                                    registry=r)
        r.register(_Gauges(read_state))

    def observe_round(self, rec: RoundRecord) -> None:
        self.rounds.labels(rec.outcome).inc()
        if rec.replayed or rec.stale:  # nothing verified
            return
        self.round_seconds.observe(rec.seconds)
        device = metrics_label(rec.device)
        self.device_rounds.labels(device).inc()
        self.device_committed.labels(device).inc(rec.committed_tokens)
        if rec.draft_tokens:
            self.drafts.inc()
            self.draft_tokens.inc(rec.draft_tokens)
            self.accepted_tokens.inc(rec.accepted_tokens)
            self.device_draft.labels(device).inc(rec.draft_tokens)
            self.device_accepted.labels(device).inc(rec.accepted_tokens)
            for pos in range(min(rec.accepted_tokens, MAX_POSITIONS)):
                self.accepted_per_pos.labels(str(pos)).inc()

    def observe_pass(self, rec: PassRecord) -> None:
        self.pass_rounds.observe(rec.rounds)
        self.pass_tokens.observe(rec.tokens)
        self.pass_seconds.observe(rec.seconds)

    async def endpoint(self) -> Response:
        """``GET /metrics``: the exposition, on the API's port or an operator-only one."""
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE)


def metrics_app(metrics: Metrics) -> FastAPI:
    """``/metrics`` alone, for ``--metrics-host``/``--metrics-port``: scraped on an address that
    only operators reach, away from the port the devices (and anyone else) can reach."""
    app = FastAPI(title="sled verifier metrics", openapi_url=None, docs_url=None, redoc_url=None)
    app.get("/metrics")(metrics.endpoint)
    return app
