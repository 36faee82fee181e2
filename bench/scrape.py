"""What scraping costs the devices: ``sled-bench scrape``.

A few simulated devices (the soak's, replaying drafts recorded from a real agent) generate against
one verifier in two interleaved kinds of phases of equal length: quiet, and scraped, where a client
sends ``/v1/stats`` and ``/metrics`` requests (half each) spread over the phase. Reported: the
devices' round latency p50/p99 in each kind of phase, and what one scrape took. Before the
percentiles were kept in a histogram, a scrape sorted up to 100,000 samples twice (~30 ms of the
event loop each) and a client at a few dozen requests a second stalled every round.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.soak import Counts, load_fleet, record
from verifier_server.auth import hash_token, new_token
from verifier_server.process import VerifierProcess


async def scrape(url: str, token: str, requests: int, duration_s: float) -> list[float]:
    """``requests`` scrapes spread evenly over ``duration_s``; the seconds each took."""
    took = []
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=30) as http:
        for i in range(requests):
            t0 = time.perf_counter()
            response = await http.get("/v1/stats" if i % 2 else "/metrics")
            response.raise_for_status()
            took.append(time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, duration_s / requests - took[-1]))
    return took


async def phase(url: str, tokens: list[str], traces: list, seconds: float, scrapes: int, token: str
                ) -> tuple[Counts, list[float]]:
    fleet = load_fleet(url, tokens, traces, seconds, think_s=0.05)
    if not scrapes:
        return await fleet, []
    tally, took = await asyncio.gather(fleet, scrape(url, token, scrapes, seconds))
    return tally, took


def _ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values) * 1e3, q)), 2) if values else 0.0


def measure(target: str, drafter: str, devices: int, phase_s: float, pairs: int, scrapes: int) -> dict:
    tokens = [new_token() for _ in range(devices)]
    operator = new_token()
    with tempfile.TemporaryDirectory() as work:
        tokens_file = Path(work) / "tokens"
        tokens_file.write_text("".join(f"dev-{i} {hash_token(t)}\n" for i, t in enumerate([*tokens, operator])))
        with VerifierProcess(target, "--no-access-log", auth=("--tokens", str(tokens_file)),
                             log=Path(work) / "verifier.log", startup_timeout_s=600) as verifier:
            traces = record(verifier.url, operator, drafter, 4, 48)
            quiet: list[float] = []
            scraped: list[float] = []
            took: list[float] = []
            errors = 0
            for _ in range(pairs):  # interleaved, so that drift on a noisy machine hits both alike
                for n, latencies in ((0, quiet), (scrapes // pairs, scraped)):
                    tally, t = asyncio.run(phase(verifier.url, tokens, traces, phase_s, n, operator))
                    latencies += tally.latencies_s
                    took += t
                    errors += sum(tally.errors.values())
            rounds = verifier.stats(operator)["round_overhead_ms"]["rounds"]
    return {
        "devices": devices, "target": target, "phase_s": phase_s, "pairs": pairs, "scrapes": len(took),
        "rounds_on_the_server": rounds, "errors": errors,
        "quiet_round_ms": {"p50": _ms(quiet, 50), "p99": _ms(quiet, 99), "rounds": len(quiet)},
        "scraped_round_ms": {"p50": _ms(scraped, 50), "p99": _ms(scraped, 99), "rounds": len(scraped)},
        "scrape_ms": {"p50": _ms(took, 50), "p99": _ms(took, 99)},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sled-bench scrape", description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-0.5b")
    ap.add_argument("--drafter", default="smollm2-135m")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--phase-s", type=float, default=30.0, help="seconds of each phase")
    ap.add_argument("--pairs", type=int, default=2, help="quiet and scraped phases, interleaved")
    ap.add_argument("--scrapes", type=int, default=500, help="stats and metrics requests in all")
    ap.add_argument("--json", type=Path, help="write the report to this file")
    args = ap.parse_args(argv)
    report = measure(args.target, args.drafter, args.devices, args.phase_s, args.pairs, args.scrapes)
    q, s = report["quiet_round_ms"], report["scraped_round_ms"]
    print(f"{report['scrapes']} scrapes (p50 {report['scrape_ms']['p50']} ms): round latency p50/p99 "
          f"{q['p50']}/{q['p99']} ms quiet, {s['p50']}/{s['p99']} ms scraped "
          f"({(s['p99'] / max(q['p99'], 1e-9) - 1) * 100:+.1f}% at p99); errors {report['errors']}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
