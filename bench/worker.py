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

from bench.workload import load, prompt_seed
from edge_agent.options import add_agent_args, load_drafter, make_agent, open_client
from shared.protocol import SamplingOptions

# One round can wait behind every other device's round on a loaded two-core machine.
REQUEST_TIMEOUT_S = 300.0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    add_agent_args(ap)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; each prompt samples with its own seed")
    ap.add_argument("--prompts", type=Path, required=True, help="JSON lines, as bench/workload.jsonl")
    ap.set_defaults(drafter="none", threads=1, timeout=REQUEST_TIMEOUT_S)
    return ap


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    prompts = load(args.prompts)
    drafter = load_drafter(args.drafter, args.threads, slowdown_ms=args.draft_slowdown)
    _emit({"ready": True})
    sys.stdin.readline()
    with open_client(args) as client:
        agent = make_agent(args, client, drafter)
        for p in prompts:
            sampling = SamplingOptions(temperature=args.temperature, seed=prompt_seed(p.id))
            result = agent.generate(p.prompt, p.message_list, args.max_tokens, sampling=sampling)
            _emit({
                "id": p.id,
                "summary": result.summary(),
                "round_latencies_s": [round(x, 6) for x in result.round_latencies_s],
                "ids": result.ids,
            })


if __name__ == "__main__":
    main()
