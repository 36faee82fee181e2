"""The device daemon's cost and concurrency: ``python -m bench.daemon [--drafter D] [--target T]``.

Starts a verifier and a ``sled-agent serve`` daemon on loopback and measures, for the same prompts:
the one-shot path (``Agent`` in this process, as ``sled-agent generate`` runs it), one local client
through the daemon's OpenAI API, and four concurrent local clients. The daemon's overhead per round
is the difference in wall time per round between the first two.
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from edge_agent.agent import Agent
from edge_agent.client import VerifierClient
from edge_agent.drafter import Drafter
from shared.models import resolve
from verifier_server.process import AgentDaemonProcess, VerifierProcess

PROMPTS = ["def merge_sort(items):\n", "class LRUCache:\n", "import json\n\ndef load(path):\n",
           "def is_prime(n):\n"]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.daemon", description=__doc__.split("\n")[0])
    ap.add_argument("--drafter", default="smollm2-135m")
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    out: dict = {"drafter": args.drafter, "target": args.target, "max_tokens": args.max_tokens}
    with VerifierProcess(args.target, "--slots", "4", "--ctx-per-slot", "1024", threads=1, cores=(0,)) as verifier:
        drafter = Drafter(resolve(args.drafter), n_threads=1)
        with VerifierClient(verifier.url) as client:
            agent = Agent(client, drafter)
            agent.generate(PROMPTS[0], max_tokens=8)  # warm-up
            t0, tokens, rounds = time.perf_counter(), 0, 0
            for p in PROMPTS:
                r = agent.generate(p, max_tokens=args.max_tokens)
                tokens, rounds = tokens + r.committed_tokens, rounds + r.rounds
            one_shot = time.perf_counter() - t0
        out["one_shot"] = {"tokens_per_s": round(tokens / one_shot, 2), "rounds": rounds,
                           "s_per_round": round(one_shot / rounds, 5)}
        with AgentDaemonProcess("--server", verifier.url, "--drafter", args.drafter, "--threads", "1",
                                "--concurrency", "4", cores=(1,)) as daemon:
            http = httpx.Client(base_url=f"{daemon.url}/v1", timeout=600)

            def complete(prompt: str) -> dict:
                body = {"model": args.target, "prompt": prompt, "max_tokens": args.max_tokens}
                return http.post("/completions", json=body).json()

            complete(PROMPTS[0])  # warm-up
            t0 = time.perf_counter()
            answers = [complete(p) for p in PROMPTS]
            alone = time.perf_counter() - t0
            d_tokens = sum(a["usage"]["completion_tokens"] for a in answers)
            d_rounds = sum(a["sled"]["rounds"] for a in answers)
            out["daemon_one_client"] = {"tokens_per_s": round(d_tokens / alone, 2), "rounds": d_rounds,
                                        "s_per_round": round(alone / d_rounds, 5)}
            out["daemon_overhead_ms_per_round"] = round((alone / d_rounds - one_shot / rounds) * 1e3, 3)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(complete, PROMPTS))
            together = time.perf_counter() - t0
            c_tokens = sum(a["usage"]["completion_tokens"] for a in answers)
            out["daemon_four_clients"] = {"tokens_per_s": round(c_tokens / together, 2),
                                          "per_client_tokens_per_s": round(c_tokens / together / 4, 2)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
