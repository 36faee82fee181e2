"""``sled-verifier``: serve the target model, run the greedy reference, prepare models."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from shared.models import REGISTRY, ModelError, fetch, resolve
from shared.sampling import add_sampling_args, sampling_from_args
from verifier_server.runner import RunnerError

if TYPE_CHECKING:
    from verifier_server.llama.backend import LlamaBackend


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="registry name or GGUF path")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU build")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sled-verifier", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the verifier HTTP server")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=int, default=8, help="KV sequences (sessions verified at once)")
    s.add_argument("--ctx-per-slot", type=int, default=2048, help="context tokens per session")
    s.add_argument("--max-sessions", type=int, default=64)
    s.add_argument("--session-ttl", type=float, default=600.0, help="seconds before an idle session expires")
    s.add_argument("--parked-mb", type=int, default=1024, help="host memory for sessions parked out of a slot")
    s.add_argument("--max-draft-tokens", type=int, default=16)
    s.add_argument("--token-budget", type=int, default=512, help="tokens per forward pass")
    s.add_argument("--wait-window-ms", type=float, default=2.0, help="how long a pass waits for the rounds of other active sessions (half a pass, if longer)")

    g = sub.add_parser("generate", help="plain greedy decoding with the same backend (the reference)")
    _add_model_args(g)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--chat", action="store_true", help="wrap PROMPT as one user message")
    add_sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("prompt")

    m = sub.add_parser("models", help="list or fetch the built-in models")
    msub = m.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="the built-in model names")
    f = msub.add_parser("fetch", help="install and assemble models ahead of time")
    f.add_argument("names", nargs="+")
    return ap


def _backend(args: argparse.Namespace, **kw: Any) -> LlamaBackend:
    from verifier_server.llama.backend import LlamaBackend

    return LlamaBackend(resolve(args.model), args.model, n_threads=args.threads, n_gpu_layers=args.gpu_layers, **kw)


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from verifier_server.app import create_app
    from verifier_server.engine import Engine, EngineConfig
    from verifier_server.llama.runner import LlamaRunner

    backend = _backend(args, n_slots=args.slots, ctx_per_slot=args.ctx_per_slot, n_batch=args.token_budget)
    runner = LlamaRunner(
        backend,
        token_budget=args.token_budget,
        wait_window_s=args.wait_window_ms / 1000,
        max_parked_bytes=args.parked_mb << 20,
    )
    config = EngineConfig(
        max_draft_tokens=args.max_draft_tokens,
        max_sessions=args.max_sessions,
        session_ttl_s=args.session_ttl,
    )
    engine = Engine(runner, config)
    print(f"sled-verifier: {args.model} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()


def _generate(args: argparse.Namespace) -> None:
    from shared.protocol import ChatMessage
    from verifier_server.llama.reference import plain_reference

    backend = _backend(args, n_slots=1, ctx_per_slot=4096)
    messages = [ChatMessage(role="user", content=args.prompt)] if args.chat else None
    prompt = backend.tokenizer.prompt_ids(None if args.chat else args.prompt, messages)
    sampling, seed = sampling_from_args(args)
    t0 = time.perf_counter()
    ref = plain_reference(backend, prompt, args.max_tokens, sampling, seed)
    elapsed = time.perf_counter() - t0
    text = ref.text.decode(errors="replace")
    if args.json:
        print(json.dumps({
            "text": text,
            "ids": ref.ids,
            "margins": [round(g, 4) for g in ref.gaps],
            "seed": None if sampling.greedy else seed,
            "committed_tokens": len(ref.ids),
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(len(ref.ids) / elapsed, 2),
            "finish_reason": ref.finish_reason,
        }))
    else:
        sys.stdout.write(text + "\n")
        print(f"{len(ref.ids)} tokens in {elapsed:.2f} s ({len(ref.ids) / elapsed:.1f} tok/s)", file=sys.stderr)


def _models(args: argparse.Namespace) -> None:
    if args.models_command == "list":
        for spec in REGISTRY.values():
            print(f"{spec.name:22} {spec.size / 1e6:8.0f} MB  {spec.tokenizer:40} {spec.description}")
        return
    for name in args.names:
        print(f"{name}: {fetch(name)}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        {"serve": _serve, "generate": _generate, "models": _models}[args.command](args)
    except (ModelError, RunnerError, ValueError) as e:
        sys.exit(f"sled-verifier: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
