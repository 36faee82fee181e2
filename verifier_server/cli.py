"""``sled-verifier``: serve the target model, run the greedy reference, prepare models."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.fleet import DeviceLimits
from shared.fleet import load as load_fleet
from shared.models import REGISTRY, ModelError, fetch, resolve
from shared.sampling import add_sampling_args, sampling_from_args
from verifier_server.auth import DEVICE_ID, Credentials, hash_token, new_token
from verifier_server.runner import RunnerError
from verifier_server.vllm.options import add_vllm_args

log = logging.getLogger("sled.verifier")
_REPLICA_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
ENGINES = ("llama.cpp", "vllm")

if TYPE_CHECKING:
    from verifier_server.llama.backend import LlamaBackend
    from verifier_server.runner import Runner
    from verifier_server.vllm.runner import VllmRunner


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="llama.cpp",
                   help="llama.cpp (default: CPUs, one GPU) or vllm (GPU servers, targets beyond one GPU)")
    p.add_argument("--model", default="qwen2.5-coder-1.5b",
                   help="registry name or GGUF path (vllm: a registry name converted once, or a converted directory)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--gpu-layers", type=int, default=0, help="layers to offload to a GPU build")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sled-verifier", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the verifier HTTP server")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=int, default=8, help="KV sequences (sessions verified at once; vllm: max_num_seqs)")
    s.add_argument("--ctx-per-slot", type=int, default=2048, help="context tokens per session (vllm: max_model_len)")
    s.add_argument("--max-sessions", type=int, default=64)
    s.add_argument("--session-ttl", type=float, default=600.0, help="seconds before an idle session expires")
    s.add_argument("--parked-mb", type=int, default=1024, help="host memory for sessions parked out of a slot")
    s.add_argument("--max-draft-tokens", type=int, default=16)
    s.add_argument("--token-budget", type=int, default=512, help="tokens per forward pass")
    s.add_argument("--wait-window-ms", type=float, default=2.0, help="how long a pass waits for the rounds of other active sessions (half a pass, if longer)")
    s.add_argument("--emulate-pass-ms", type=float, default=0.0,
                   help="benchmarks: pad every forward pass to this time, a GPU-like fixed cost (0: off)")
    s.add_argument("--replay", type=Path, metavar="FILE",
                   help="benchmarks: answer from recorded greedy decodings (JSON lines of ids, made by "
                        "sled-bench strategies) instead of running the model; with --emulate-pass-ms, a "
                        "verifier with a GPU's timing")
    add_vllm_args(s)
    a = s.add_argument_group("devices", "who may call, and how much (see deploy/README.md)")
    a.add_argument("--auth", choices=("token", "none"), default="token",
                   help="token: per-device bearer tokens from --fleet or --tokens; none: anyone (a lab only)")
    a.add_argument("--fleet", type=Path, help="fleet file: device token hashes and verifier.device_limits")
    a.add_argument("--tokens", type=Path, help="tokens file: '<device> sha256:<hex>' lines")
    a.add_argument("--device-sessions", type=int, default=None, help="sessions one device may hold (default 16)")
    a.add_argument("--device-rounds-per-s", type=float, default=None,
                   help="verify rounds per second per device, token bucket (default 100; 0: no limit)")
    a.add_argument("--device-burst", type=float, default=None, help="rounds a device may send at once (default 200)")
    o = s.add_argument_group("operations")
    o.add_argument("--replica-id", default="",
                   help="this replica's name behind a load balancer: session ids start with it (deploy/nginx)")
    o.add_argument("--drain-grace", type=float, default=30.0,
                   help="on SIGTERM, seconds to let rounds in flight finish before exiting")
    o.add_argument("--drain-linger", type=float, default=2.0,
                   help="on SIGTERM, seconds to keep answering (readyz 503) even when idle, so load "
                        "balancers polling readiness see the drain before the port closes (default 2)")
    o.add_argument("--no-access-log", action="store_true", help="no JSON line per request on stderr")
    o.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics on this port only (not on the API's port), for operators' scrapers")
    o.add_argument("--metrics-host", default="127.0.0.1", help="address of --metrics-port (default loopback)")

    g = sub.add_parser("generate", help="plain greedy decoding with the same backend (the reference)")
    _add_model_args(g)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--chat", action="store_true", help="wrap PROMPT as one user message")
    add_sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("prompt")

    t = sub.add_parser("tokens", help="device credentials")
    tsub = t.add_subparsers(dest="tokens_command", required=True)
    tn = tsub.add_parser("new", help="a fresh token for a device, printed once, and the line to store its hash")
    tn.add_argument("--device", required=True)

    m = sub.add_parser("models", help="list or fetch the built-in models")
    msub = m.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="the built-in model names")
    f = msub.add_parser("fetch", help="install and assemble models ahead of time")
    f.add_argument("names", nargs="+")
    c = msub.add_parser("convert", help="write a registry model's HF directory for --engine vllm (once; the vLLM environment)")
    c.add_argument("names", nargs="+")
    return ap


def _backend(args: argparse.Namespace, **kw: Any) -> LlamaBackend:
    from verifier_server.llama.backend import LlamaBackend

    return LlamaBackend(resolve(args.model), args.model, n_threads=args.threads, n_gpu_layers=args.gpu_layers, **kw)


def _llama_runner(args: argparse.Namespace) -> Runner:
    from verifier_server.llama.forward import FixedCostBackend, ForwardBackend
    from verifier_server.llama.runner import LlamaRunner

    backend: ForwardBackend
    if args.replay is not None:
        from verifier_server.llama.replay import ReplayBackend, load_recordings

        backend = ReplayBackend(resolve(args.model), args.model, load_recordings(args.replay), n_slots=args.slots,
                                ctx_per_slot=args.ctx_per_slot, n_batch=args.token_budget)
    else:
        backend = _backend(args, n_slots=args.slots, ctx_per_slot=args.ctx_per_slot, n_batch=args.token_budget)
    if args.emulate_pass_ms > 0:
        backend = FixedCostBackend(backend, args.emulate_pass_ms / 1000)
    return LlamaRunner(backend, token_budget=args.token_budget, wait_window_s=args.wait_window_ms / 1000,
                       max_parked_bytes=args.parked_mb << 20)


def vllm_runner(args: argparse.Namespace) -> VllmRunner:
    """vLLM over the converted directory, tokenizing with its GGUF's vocabulary (as llama.cpp does)."""
    from shared.llama_tokenizer import LlamaTokenizer, load_model
    from verifier_server.vllm.convert import check_vocabulary, model_dir, tokenizer_gguf
    from verifier_server.vllm.options import options_from_args

    if args.replay is not None or args.emulate_pass_ms > 0 or args.gpu_layers:
        raise ValueError("--replay, --emulate-pass-ms and --gpu-layers are llama.cpp's; vLLM uses every GPU it is given")
    options = options_from_args(args, model_dir=lambda: str(model_dir(args.model)))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # not a line per load step and request
    if args.threads is not None:  # a CPU build: vLLM's OpenMP threads, none kept back for itself
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from verifier_server.vllm.runner import VllmRunner

    tokenizer = LlamaTokenizer(load_model(tokenizer_gguf(Path(options.model_dir), args.tokenizer), vocab_only=True))
    check_vocabulary(Path(options.model_dir), tokenizer.n_vocab)
    return VllmRunner(options, tokenizer, args.model, top_k=args.top_k_rows, full_rows=args.full_rows)


def _access(args: argparse.Namespace) -> tuple[Credentials, DeviceLimits]:
    """Credentials and per-device limits from the options, checked before the model loads."""
    fleet = load_fleet(args.fleet) if args.fleet is not None else None
    if args.auth == "none":
        if args.tokens is not None:
            raise ValueError("--auth none ignores --tokens: give one or the other")
        credentials = Credentials.none()
    elif args.tokens is not None:
        credentials = Credentials.from_tokens_file(args.tokens)
    elif fleet is not None:
        credentials = Credentials.from_fleet(fleet, str(args.fleet))
    else:
        raise ValueError("device tokens are needed: give --fleet FILE or --tokens FILE "
                         "(sled-verifier tokens new --device ID), or --auth none for a lab")
    limits = fleet.verifier.device_limits if fleet is not None else DeviceLimits()
    flags = {"sessions": args.device_sessions, "rounds_per_s": args.device_rounds_per_s, "burst": args.device_burst}
    limits = DeviceLimits.model_validate({**limits.model_dump(), **{k: v for k, v in flags.items() if v is not None}})
    return credentials, limits


def _serve(args: argparse.Namespace) -> None:
    from verifier_server.app import create_app
    from verifier_server.engine import Engine, EngineConfig
    from verifier_server.server import serve

    if args.replica_id and not _REPLICA_ID.match(args.replica_id):
        raise ValueError(f"--replica-id '{args.replica_id}': use letters, digits, '-' and '_' (at most 32)")
    credentials, limits = _access(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("sled.access").setLevel(logging.WARNING if args.no_access_log else logging.INFO)
    if not credentials.enabled:
        log.warning("WARNING: --auth none: any client that reaches this port may create and drive any session. "
                    "For a lab only; use --fleet or --tokens in production.")

    runner = vllm_runner(args) if args.engine == "vllm" else _llama_runner(args)
    config = EngineConfig(
        max_draft_tokens=args.max_draft_tokens,
        max_sessions=args.max_sessions,
        session_ttl_s=args.session_ttl,
        device_sessions=limits.sessions,
    )
    engine = Engine(runner, config, session_prefix=f"{args.replica_id}." if args.replica_id else "")
    who = f"{len(credentials.devices)} devices" if credentials.enabled else "no authentication"
    log.warning("sled-verifier: %s on http://%s:%d (%s%s)", args.model, args.host, args.port, who,
                f", replica '{args.replica_id}'" if args.replica_id else "")
    try:
        app = create_app(engine, credentials, limits, serve_metrics=args.metrics_port is None)
        metrics = None if args.metrics_port is None else (args.metrics_host, args.metrics_port)
        serve(app, engine, args.host, args.port, args.drain_grace, args.drain_linger, metrics)
    finally:
        engine.close()


def _tokens(args: argparse.Namespace) -> None:
    if not DEVICE_ID.match(args.device):
        raise ValueError(f"device id '{args.device}': use letters, digits, '.', '-' and '_'")
    token = new_token()
    digest = hash_token(token)
    print(f"""token for device '{args.device}' (shown once: give it to the device, e.g. in /etc/sled/agent.env):
  SLED_TOKEN={token}
store its hash on the verifier, either in the fleet file under devices.{args.device}:
  token_sha256: {digest}
or as a line of a tokens file (--tokens):
  {args.device} {digest}""")


def _generate(args: argparse.Namespace) -> None:
    from shared.protocol import ChatMessage

    messages = [ChatMessage(role="user", content=args.prompt)] if args.chat else None
    sampling, seed = sampling_from_args(args)
    if args.engine == "vllm":
        from verifier_server.vllm import reference as vllm_reference

        runner = vllm_runner(serve_args(["--model", args.model, "--ctx-per-slot", "4096", "--slots", "1",
                                         *(["--threads", str(args.threads)] if args.threads else [])]))
        prompt = runner.tokenizer.prompt_ids(None if args.chat else args.prompt, messages)
        t0 = time.perf_counter()
        ref = vllm_reference.plain_reference(runner, prompt, args.max_tokens, sampling, seed)
        runner.close()
    else:
        from verifier_server.llama.reference import plain_reference

        backend = _backend(args, n_slots=1, ctx_per_slot=4096)
        prompt = backend.tokenizer.prompt_ids(None if args.chat else args.prompt, messages)
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
    if args.models_command == "convert":
        from verifier_server.vllm.convert import convert

        for name in args.names:
            print(f"{name}: {convert(name)}")
        return
    for name in args.names:
        print(f"{name}: {fetch(name)}")


def serve_args(argv: list[str]) -> argparse.Namespace:
    """``sled-verifier serve`` options, parsed (for tools that load a runner the same way)."""
    return _parser().parse_args(["serve", *argv])


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        {"serve": _serve, "generate": _generate, "models": _models, "tokens": _tokens}[args.command](args)
    except (ModelError, RunnerError, ValueError, OSError) as e:
        sys.exit(f"sled-verifier: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
