"""One benchmark device: ``python -m bench.worker --server URL --prompts FILE ...``.

Runs in its own process, as a real edge agent would: it loads its drafter once, prints
``{"ready": true}``, and waits for one line on stdin, so that the benchmark can start every device at
the same moment and leave model loading out of the measurement. It then runs
``edge_agent.agent.Agent`` over its prompts one after another and prints one JSON line per prompt:
``{"id", "summary", "round_latencies_s", "ids"}`` (``summary`` is ``GenerationResult.summary()``,
which holds the finish reason; ``ids`` are the committed target ids, for the lossless check).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_agent.agent import DEFAULT_DRAFT_TOKENS, Agent
from edge_agent.client import VerifierClient
from shared.models import resolve

from bench.workload import load

# One round can wait behind every other device's round on a loaded two-core machine.
REQUEST_TIMEOUT_S = 300.0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    ap.add_argument("--server", required=True, help="verifier base URL")
    ap.add_argument("--prompts", type=Path, required=True, help="JSON lines, as bench/workload.jsonl")
    ap.add_argument("--drafter", default="none", help="registry name or GGUF path; 'none' for plain decoding")
    ap.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS)
    ap.add_argument("--fixed-draft", action="store_true", help="ignore the verifier's draft-length hint")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="drafter CPU threads")
    ap.add_argument("--network-delay-ms", type=float, default=0.0, help="emulated extra round-trip time")
    return ap


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    from edge_agent.drafter import Drafter  # llama.cpp: import only once the arguments are valid

    prompts = load(args.prompts)
    drafter = None if args.drafter == "none" else Drafter(resolve(args.drafter), n_threads=args.threads)
    _emit({"ready": True})
    sys.stdin.readline()
    delay_s = args.network_delay_ms / 1000
    with VerifierClient(args.server, timeout_s=REQUEST_TIMEOUT_S, network_delay_s=delay_s) as client:
        agent = Agent(client, drafter, args.draft_tokens, follow_hint=not args.fixed_draft)
        for p in prompts:
            result = agent.generate(p.prompt, p.message_list, args.max_tokens)
            _emit({
                "id": p.id,
                "summary": result.summary(),
                "round_latencies_s": [round(x, 6) for x in result.round_latencies_s],
                "ids": result.ids,
            })


if __name__ == "__main__":
    main()
