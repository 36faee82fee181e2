"""The verifier under a fleet for a long time: ``sled-bench soak`` (or ``python -m bench.soak``).

First a real agent (a GGUF drafter through llama.cpp) generates the workload's prompts through the
verifier, and every draft it sends is recorded. Then many simulated devices, each with its own
token, replay those recorded drafts round after round, session after session, for the whole
duration: plain async HTTP clients, so that hundreds of them fit on one machine beside the
verifier. Each waits a think time between rounds (the device drafting).

Reported: the verifier process's resident memory at the start of the load, its peak and at the
end (bounded memory: sessions come and go, parked state is capped); round latency p50/p99 as the
devices see it; errors (any answer that is not a success, or a failed connection); sessions
created, and the verifier's evictions, parked sessions and rebuilds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import msgpack
import numpy as np

from bench.workload import DEFAULT_WORKLOAD, load
from edge_agent.agent import Agent
from edge_agent.client import VerifierClient
from edge_agent.drafter import Drafter
from shared.codec import MSGPACK, encode
from shared.models import resolve
from shared.protocol import ChatMessage, Proposal, SessionCreate, VerifyRequest, VerifyResponse
from verifier_server.auth import hash_token, new_token
from verifier_server.process import VerifierProcess


@dataclass(frozen=True)
class Trace:
    """One recorded generation: its prompt and the draft the agent sent in each round."""

    prompt: str | None
    messages: list[ChatMessage] | None
    max_tokens: int
    drafts: list[bytes]


class RecordingClient(VerifierClient):
    """A verifier client that keeps every draft it sends, round by round."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(url, token=token)
        self.drafts: list[bytes] = []

    def verify(self, session_id: str, round_no: int, draft: bytes, draft_ids: list[int] | None = None,
               proposals: list[Proposal] | None = None, chained: int = 0) -> VerifyResponse:
        self.drafts.append(draft)
        return super().verify(session_id, round_no, draft, draft_ids, proposals, chained)


def record(url: str, token: str, drafter_name: str, n_prompts: int, max_tokens: int) -> list[Trace]:
    """Real agent runs over the workload's first prompts; their drafts become the replay."""
    drafter = Drafter(resolve(drafter_name), n_threads=1)
    traces = []
    for p in load(DEFAULT_WORKLOAD)[:n_prompts]:
        client = RecordingClient(url, token=token)
        with client:
            Agent(client, drafter, draft_tokens=6, follow_hint=False).generate(p.prompt, p.message_list, max_tokens)
            traces.append(Trace(p.prompt, p.message_list, max_tokens, client.drafts))
    return traces


@dataclass
class Counts:
    """What the simulated devices saw, together."""

    latencies_s: list[float] = field(default_factory=list)
    sessions: int = 0
    rounds: int = 0
    committed_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def device(http: httpx.AsyncClient, token: str, traces: list[Trace], until: float, think_s: float,
                 tally: Counts, rng: random.Random) -> None:
    """One simulated device: sessions one after another, each replaying a recorded trace."""
    headers = {"authorization": f"Bearer {token}", "content-type": MSGPACK, "accept": MSGPACK}
    await asyncio.sleep(rng.uniform(0, 2 * think_s + 1.0))  # devices do not start in lockstep
    while time.monotonic() < until:
        trace = rng.choice(traces)
        create = SessionCreate(prompt=trace.prompt, messages=trace.messages, max_tokens=trace.max_tokens)
        try:
            r = await http.post("/v1/sessions", content=encode(create, True), headers=headers)
        except httpx.HTTPError as e:
            tally.error(f"create: {type(e).__name__}")
            continue
        if r.status_code != 201:
            tally.error(f"create: HTTP {r.status_code}")
            await asyncio.sleep(1.0)
            continue
        sid = msgpack.unpackb(r.content)["session_id"]
        tally.sessions += 1
        round_no, finished = 1, False
        while not finished and time.monotonic() < until:
            await asyncio.sleep(think_s * rng.uniform(0.5, 1.5))
            draft = trace.drafts[round_no - 1] if round_no <= len(trace.drafts) else b""
            body = encode(VerifyRequest(round=round_no, draft=draft), True)
            t0 = time.perf_counter()
            try:
                r = await http.post(f"/v1/sessions/{sid}/verify", content=body, headers=headers)
            except httpx.HTTPError as e:
                tally.error(f"verify: {type(e).__name__}")
                break
            if r.status_code != 200:
                tally.error(f"verify: HTTP {r.status_code}")
                break
            tally.latencies_s.append(time.perf_counter() - t0)
            answer = msgpack.unpackb(r.content)
            tally.rounds += 1
            tally.committed_tokens += len(answer["ids"])
            finished, round_no = answer["finished"], round_no + 1
        try:
            await http.delete(f"/v1/sessions/{sid}", headers=headers)
        except httpx.HTTPError as e:
            tally.error(f"delete: {type(e).__name__}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler(threading.Thread):
    """Samples the verifier's RSS and parked sessions every second while the load runs."""

    def __init__(self, verifier: VerifierProcess, token: str) -> None:
        super().__init__(daemon=True)
        self.verifier, self.token = verifier, token
        self.rss: list[float] = []
        self.parked: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.rss.append(rss_mb(self.verifier.proc.pid))
            self.parked.append(self.verifier.stats(self.token)["parked_sessions"])


async def load_fleet(url: str, tokens: list[str], traces: list[Trace], duration_s: float, think_s: float,
                     timeout_s: float = 120.0) -> Counts:
    tally = Counts()
    until = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=len(tokens) + 8, max_keepalive_connections=len(tokens) + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(timeout_s, connect=10.0)) as http:
        await asyncio.gather(*(device(http, t, traces, until, think_s, tally, random.Random(i))
                               for i, t in enumerate(tokens)))
    return tally


@dataclass
class SoakReport:
    devices: int
    duration_s: float
    target: str
    drafter: str
    sessions: int
    rounds: int
    committed_tokens: int
    errors: dict[str, int]
    round_latency_ms: dict[str, float]
    rss_mb: dict[str, float]
    parked_sessions_peak: int
    evictions: int
    rebuilds: int

    def summary(self) -> str:
        lat, rss = self.round_latency_ms, self.rss_mb
        return (f"{self.devices} devices for {self.duration_s:.0f} s against {self.target} (drafts recorded from "
                f"{self.drafter}): {self.sessions} sessions, {self.rounds} rounds, {self.committed_tokens} tokens, "
                f"errors {sum(self.errors.values())} {self.errors or ''}; round latency p50 {lat['p50']:.0f} ms, "
                f"p99 {lat['p99']:.0f} ms; verifier RSS start {rss['start']:.0f} MB, peak {rss['peak']:.0f} MB, "
                f"end {rss['end']:.0f} MB; parked sessions peak {self.parked_sessions_peak}, "
                f"evictions {self.evictions}, rebuilds {self.rebuilds}")


def soak(devices: int, duration_s: float, target: str, drafter: str, think_ms: float, prompts: int,
         max_tokens: int, slots: int, parked_mb: int, threads: int | None = None, timeout_s: float = 120.0
         ) -> SoakReport:
    tokens = {f"sim-{i:04d}": new_token() for i in range(devices)}
    recorder = new_token()
    with tempfile.TemporaryDirectory() as work:
        tokens_file = Path(work) / "tokens"
        tokens_file.write_text("".join(f"{d} {hash_token(t)}\n" for d, t in [*tokens.items(), ("recorder", recorder)]))
        options = ["--slots", str(slots), "--ctx-per-slot", "1024", "--max-sessions", str(devices + 16),
                   "--parked-mb", str(parked_mb), "--no-access-log", "--session-ttl", "120"]
        with VerifierProcess(target, *options, threads=threads or 2, auth=("--tokens", str(tokens_file)),
                             log=Path(work) / "verifier.log", startup_timeout_s=600) as verifier:
            traces = record(verifier.url, recorder, drafter, prompts, max_tokens)
            start_rss = rss_mb(verifier.proc.pid)
            sampler = Sampler(verifier, recorder)
            sampler.start()
            tally = asyncio.run(load_fleet(verifier.url, list(tokens.values()), traces, duration_s, think_ms / 1000,
                                           timeout_s))
            sampler.stop.set()
            sampler.join()
            time.sleep(1.0)
            end_rss = rss_mb(verifier.proc.pid)
            stats = verifier.stats(recorder)
    lat = np.asarray(tally.latencies_s) * 1e3
    p50, p99 = np.percentile(lat, [50, 99]) if lat.size else (0.0, 0.0)
    return SoakReport(
        devices=devices, duration_s=duration_s, target=target, drafter=drafter, sessions=tally.sessions,
        rounds=tally.rounds, committed_tokens=tally.committed_tokens, errors=tally.errors,
        round_latency_ms={"p50": round(float(p50), 1), "p99": round(float(p99), 1)},
        rss_mb={"start": round(start_rss, 1), "peak": round(max([start_rss, end_rss, *sampler.rss]), 1),
                "end": round(end_rss, 1)},
        parked_sessions_peak=max(sampler.parked, default=0), evictions=stats["evictions"], rebuilds=stats["rebuilds"],
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sled-bench soak", description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--target", default="qwen2.5-coder-0.5b")
    ap.add_argument("--drafter", default="smollm2-135m", help="the drafter whose recorded drafts are replayed")
    ap.add_argument("--think-ms", type=float, default=50.0, help="a device's drafting time between rounds")
    ap.add_argument("--prompts", type=int, default=8, help="workload prompts recorded")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=64, help="the verifier's KV slots (sessions verified at once)")
    ap.add_argument("--parked-mb", type=int, default=512, help="host memory for parked sessions")
    ap.add_argument("--timeout-s", type=float, default=120.0,
                    help="a device's wait for an answer: a CPU verifier makes a thousand devices wait minutes")
    ap.add_argument("--json", type=Path, help="write the report to this file")
    args = ap.parse_args(argv)
    report = soak(args.devices, args.minutes * 60, args.target, args.drafter, args.think_ms, args.prompts,
                  args.max_tokens, args.slots, args.parked_mb, timeout_s=args.timeout_s)
    print(report.summary(), file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2))
    if report.errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
