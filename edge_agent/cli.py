"""``sled-agent``: generate text on the device, drafting locally and verifying on the server."""
from __future__ import annotations

import argparse
import codecs
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

from edge_agent.client import VerifierClient, VerifierError
from edge_agent.options import (
    DEFAULT_SERVER,
    add_agent_args,
    device_token,
    load_drafter,
    make_agent,
    open_client,
    read_secret,
)
from shared.models import ModelError
from shared.protocol import ChatMessage
from shared.sampling import add_sampling_args, options_from_args

M = TypeVar("M", bound=BaseModel)


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

    d = sub.add_parser("serve", help="run the device daemon: an OpenAI-compatible API for local apps")
    add_agent_args(d)
    d.add_argument("--config", type=Path, help="fleet file: this device's settings (flags given here win)")
    d.add_argument("--device", help="this device's id in the fleet file")
    d.add_argument("--host", default=None, help="bind address (default 127.0.0.1: local apps only)")
    d.add_argument("--port", type=int, default=None, help="local API port (default 8080)")
    d.add_argument("--concurrency", type=int, default=None, help="generations at once (default 2)")
    d.add_argument("--queue", type=int, default=None, help="requests waiting beyond those; then 429 (default 8)")
    d.add_argument("--fallback", choices=("none", "local"), default=None,
                   help="local: when no verifier answers, reply from the drafter alone, marked as such")
    d.add_argument("--api-key-file", type=Path, default=None,
                   help="file holding the key local apps must send (OpenAI's 'Authorization: Bearer'); "
                        "needed to listen beyond loopback")
    d.add_argument("--insecure-listen", action="store_true",
                   help="listen beyond loopback without an API key (anyone who reaches the port may generate)")
    # Unset means: the fleet file's setting, else the built-in default.
    d.set_defaults(drafter=None, draft_tokens=None, timeout=None, deadline=None, max_tokens=256)

    c = sub.add_parser("config", help="check and inspect a fleet file")
    csub = c.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="check a fleet file (file, line and field of every problem)")
    v.add_argument("file", type=Path)
    sh = csub.add_parser("show", help="one device's effective settings (its group with its overrides)")
    sh.add_argument("file", type=Path)
    sh.add_argument("--device", required=True)
    csub.add_parser("schema", help="the fleet file's JSON Schema, for editors")
    return ap


def _overridden(model: M, **flags: Any) -> M:
    """``model`` with the flags that were given (not None) applied, validated again."""
    return type(model).model_validate({**model.model_dump(), **{k: v for k, v in flags.items() if v is not None}})


def _is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the API on this machine. A host name other than localhost
    may resolve to anything, so it counts as beyond loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _local_api_key(host: str, key_file: Path | None, insecure: bool) -> str | None:
    """The key local apps must send, if any. The API generates on the device's account, so it
    is refused beyond loopback without a key unless ``--insecure-listen`` says so."""
    if key_file is not None:
        return read_secret(key_file, "--api-key-file")
    if not _is_loopback(host):
        if not insecure:
            raise ValueError(f"refusing to serve the API on {host} without an API key: give --api-key-file FILE "
                             "(apps send it as 'Authorization: Bearer KEY'), listen on 127.0.0.1, or pass "
                             "--insecure-listen")
        print(f"sled-agent: WARNING: serving the API on {host} without an API key (--insecure-listen)",
              file=sys.stderr, flush=True)
    return None


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from edge_agent.daemon import DaemonConfig, create_daemon
    from shared import fleet

    verifier, settings, token = fleet.Verifier(urls=[DEFAULT_SERVER]), fleet.DeviceSettings(), None
    if args.config is not None:
        if not args.device:
            raise ValueError("--config needs --device (this device's id in the fleet file)")
        device = fleet.effective(fleet.load(args.config), args.device)
        verifier, settings = device.verifier, device.settings
        token = device.token() if args.token_file is None else None
    token = token or device_token(args.token_file)  # --token-file wins, then $SLED_TOKEN
    # Flags given on the command line win over the fleet file.
    verifier = _overridden(verifier, urls=args.server, timeout_s=args.timeout,
                           retry=_overridden(verifier.retry, deadline_s=args.deadline))
    settings = _overridden(settings, drafter=args.drafter, threads=args.threads, max_draft_tokens=args.draft_tokens,
                           fallback=args.fallback, api=_overridden(settings.api, host=args.host, port=args.port,
                                                                   concurrency=args.concurrency, queue=args.queue))
    api_key = _local_api_key(settings.api.host, args.api_key_file, args.insecure_listen)  # before anything loads
    drafters = [load_drafter(settings.drafter, settings.threads, settings.context, settings.gpu_layers,
                             args.draft_slowdown) for _ in range(settings.api.concurrency)]
    try:
        with VerifierClient(verifier.urls, timeout_s=5, retries=0, token=token) as client:
            info = client.info()
        model, limits = info.model, info.limits
    except VerifierError:
        # The verifier is not up yet: the name is only a label for /v1/models, and the daemon asks
        # for the limits at its first request.
        model, limits = "sled", None
    config = DaemonConfig(verifier, settings, model, max_tokens=args.max_tokens, sampling_mode=args.sampling,
                          follow_hint=not args.fixed_draft, token=token, adaptive=args.adaptive,
                          pipelined=args.pipelined, api_key=api_key, verifier_limits=limits)
    api = settings.api
    print(f"sled-agent: serving the OpenAI API on http://{api.host}:{api.port}/v1 "
          f"(verifier: {', '.join(verifier.urls)})", file=sys.stderr, flush=True)
    uvicorn.run(create_daemon(config, drafters), host=api.host, port=api.port, log_level="warning")


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
    drafter = load_drafter(args.drafter, args.threads, slowdown_ms=args.draft_slowdown)
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
        if result.decisions:  # --adaptive: the draft controller's choice in every round
            summary["controller"] = result.decisions
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
        {"generate": _generate, "serve": _serve, "config": _config}[args.command](args)
    except (ModelError, VerifierError, ValueError) as e:
        sys.exit(f"sled-agent: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
