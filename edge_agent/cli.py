"""``sled-agent``: generate text on the device, drafting locally and verifying on the server."""
from __future__ import annotations

import argparse
import json
import sys

from edge_agent.agent import DEFAULT_DRAFT_TOKENS, Agent
from edge_agent.client import VerifierClient, VerifierError
from shared.models import ModelError, resolve
from shared.protocol import ChatMessage


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sled-agent", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion for PROMPT")
    g.add_argument("--server", default="http://127.0.0.1:8000", help="verifier base URL")
    g.add_argument("--drafter", default="smollm2-135m", help="registry name or GGUF path; 'none' for plain decoding")
    g.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS, help="longest draft per round")
    g.add_argument("--fixed-draft", action="store_true", help="ignore the verifier's draft-length hint")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap PROMPT as one user message")
    g.add_argument("--threads", type=int, default=None, help="drafter CPU threads")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    g.add_argument("--network-delay-ms", type=float, default=0.0, help="emulated extra round-trip time")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.add_argument("prompt")
    return ap


def _generate(args: argparse.Namespace) -> None:
    from edge_agent.drafter import Drafter

    drafter = None if args.drafter == "none" else Drafter(resolve(args.drafter), n_threads=args.threads)
    messages = [ChatMessage(role="user", content=args.prompt)] if args.chat else None
    prompt = None if args.chat else args.prompt

    def stream(chunk: bytes) -> None:
        sys.stdout.write(chunk.decode())
        sys.stdout.flush()

    with VerifierClient(args.server, timeout_s=args.timeout, network_delay_s=args.network_delay_ms / 1000) as client:
        agent = Agent(client, drafter, args.draft_tokens, follow_hint=not args.fixed_draft)
        result = agent.generate(prompt, messages, args.max_tokens, args.stop, None if args.json else stream)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return
    print(file=sys.stdout)
    print(
        f"rounds {summary['rounds']}  committed {summary['committed_tokens']}  "
        f"draft {summary['draft_tokens']}  accepted {summary['accepted_draft_tokens']}  "
        f"tokens/round {summary['tokens_per_round']}  {summary['tokens_per_s']} tok/s  "
        f"finish {summary['finish_reason']}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        _generate(args)
    except (ModelError, VerifierError) as e:
        sys.exit(f"sled-agent: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
