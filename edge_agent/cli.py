"""``sled-agent``: generate text on the device, drafting locally and verifying on the server."""
from __future__ import annotations

import argparse
import codecs
import json
import sys
from pathlib import Path

import yaml

from edge_agent.client import VerifierError
from edge_agent.options import add_agent_args, load_drafter, make_agent, open_client
from shared.models import ModelError
from shared.protocol import ChatMessage
from shared.sampling import add_sampling_args, options_from_args


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sled-agent", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion for PROMPT")
    add_agent_args(g)
    add_sampling_args(g)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap PROMPT as one user message")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    g.add_argument("prompt")

    c = sub.add_parser("config", help="check and inspect a fleet file")
    csub = c.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="check a fleet file (file, line and field of every problem)")
    v.add_argument("file", type=Path)
    sh = csub.add_parser("show", help="one device's effective settings (its group with its overrides)")
    sh.add_argument("file", type=Path)
    sh.add_argument("--device", required=True)
    csub.add_parser("schema", help="the fleet file's JSON Schema, for editors")
    return ap


def _config(args: argparse.Namespace) -> None:
    from shared import fleet

    if args.config_command == "schema":
        print(json.dumps(fleet.schema(), indent=2))
        return
    loaded = fleet.load(args.file)
    if args.config_command == "validate":
        print(f"{args.file}: valid ({len(loaded.devices)} devices in {len(loaded.groups)} groups)")
        return
    shown = fleet.effective(loaded, args.device).model_dump(mode="json")
    print(yaml.safe_dump(shown, sort_keys=False), end="")


def _generate(args: argparse.Namespace) -> None:
    options = options_from_args(args)  # bad options fail before the drafter loads
    drafter = load_drafter(args)
    messages = [ChatMessage(role="user", content=args.prompt)] if args.chat else None
    prompt = None if args.chat else args.prompt
    # Answers are whole UTF-8, but a decoder that carries a split character over is safe whatever
    # the server sends.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def stream(chunk: bytes) -> None:
        sys.stdout.write(decoder.decode(chunk))
        sys.stdout.flush()

    with open_client(args) as client:
        agent = make_agent(args, client, drafter)
        result = agent.generate(prompt, messages, args.max_tokens, args.stop, None if args.json else stream,
                                options)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return
    print(decoder.decode(b"", final=True), file=sys.stdout)
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
        {"generate": _generate, "config": _config}[args.command](args)
    except (ModelError, VerifierError, ValueError) as e:
        sys.exit(f"sled-agent: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
