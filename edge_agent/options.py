"""The agent's command-line options, defined once for ``sled-agent`` and the benchmark's devices."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.agent import DEFAULT_DRAFT_TOKENS, Agent
from edge_agent.client import VerifierClient
from shared.models import resolve

if TYPE_CHECKING:
    from edge_agent.drafter import Drafter
    from edge_agent.drafting import DraftSource


DEFAULT_SERVER = "http://127.0.0.1:8000"
TOKEN_ENV = "SLED_TOKEN"


def add_agent_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--server", action="append", metavar="URL",
                    help=f"verifier base URL; repeat it for replicas to fail over between (default {DEFAULT_SERVER})")
    ap.add_argument("--deadline", type=float, default=30.0,
                    help="seconds without any verifier answering before a generation fails")
    ap.add_argument("--drafter", default="smollm2-135m",
                    help="registry name or GGUF path; 'ngram' (no model), 'ngram+NAME' (n-gram, then the model), "
                         "'none' for plain decoding")
    ap.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS, help="longest draft per round, in drafter tokens")
    ap.add_argument("--fixed-draft", action="store_true", help="ignore the verifier's draft-length hint")
    ap.add_argument("--adaptive", action="store_true",
                    help="size each draft for the most tokens per second of this device's time (within the hint), "
                         "and stop a draft where the drafter's confidence is low")
    ap.add_argument("--pipelined", action="store_true", help="keep drafting while a round is in flight")
    ap.add_argument("--draft-slowdown", type=float, default=0.0, metavar="MS",
                    help="sleep per draft step, to emulate a slower board")
    ap.add_argument("--sampling", choices=("auto", "slem", "tli"), default="auto",
                    help="how a sampled session drafts: token-level intersection (tli), plain drafts (slem), "
                         "or tli where the drafter's vocabulary is the target's (auto)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="drafter CPU threads (default: all cores)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--network-delay-ms", type=float, default=0.0, help="emulated extra round-trip time")
    ap.add_argument("--token-file", type=Path, default=None,
                    help=f"file holding this device's verifier token (default: ${TOKEN_ENV}, if set)")


def read_secret(path: Path, flag: str) -> str:
    """The secret held in ``path`` (named by ``flag``), stripped; a clear error when it cannot be
    read or is empty (an empty key would let anyone in, or send no token)."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {flag} {path}: {getattr(e, 'strerror', None) or e}") from None
    if not secret:
        raise ValueError(f"{flag} {path} is empty")
    return secret


def device_token(path: Path | None) -> str | None:
    """This device's bearer token: from ``path``, else the ``SLED_TOKEN`` environment variable."""
    if path is None:
        return os.environ.get(TOKEN_ENV, "").strip() or None
    return read_secret(path, "--token-file")


def load_drafter(name: str, threads: int | None, context: int = 4096, gpu_layers: int = 0,
                 slowdown_ms: float = 0.0) -> Drafter | DraftSource | None:
    """The drafter named: a GGUF model, ``ngram``, ``ngram+MODEL``, or None for 'none' (plain
    decoding). Imports llama.cpp only now, so that bad options fail fast."""
    from edge_agent.drafter import Drafter
    from edge_agent.drafting import HierarchicalSource, ModelSource, NgramSource

    if name == "none":
        return None
    if name == "ngram":
        return NgramSource()
    model = name.removeprefix("ngram+")
    drafter = Drafter(resolve(model), n_ctx=context, n_threads=threads, n_gpu_layers=gpu_layers,
                      slowdown_s=slowdown_ms / 1000)
    return HierarchicalSource(ModelSource(drafter)) if model != name else drafter


def open_client(args: argparse.Namespace) -> VerifierClient:
    return VerifierClient(args.server or [DEFAULT_SERVER], timeout_s=args.timeout,
                          network_delay_s=args.network_delay_ms / 1000, token=device_token(args.token_file))


def make_agent(args: argparse.Namespace, client: VerifierClient, drafter: Drafter | DraftSource | None) -> Agent:
    return Agent(client, drafter, args.draft_tokens, follow_hint=not args.fixed_draft, sampling_mode=args.sampling,
                 deadline_s=args.deadline, adaptive=args.adaptive, pipelined=args.pipelined)
