"""Drafting strategies against the link and the board: ``sled-bench strategies``.

Each strategy runs on N real device processes (``bench.worker``, the agent as it ships) at each
emulated network delay, against one verifier whose forward passes take a fixed time
(``--emulate-pass-ms``: a GPU-like cost, flat in the number of tokens, on this CPU machine).
``--draft-slowdown`` makes each draft step sleep, to emulate a slower board (a Raspberry Pi).

Strategies:
- ``plain``: no drafter.
- ``hint``: the agent before this work. It follows the server's draft-length hint.
- ``fixed``: always the longest draft.
- ``adaptive``: the device's draft controller.
- ``adaptive+pipelined``: the controller, drafting while rounds are in flight.
- ``ngram``: the model-free drafter.
- ``ngram+gguf``: the n-gram drafter, with the model extending or replacing it.

Reported per strategy, delay and N:
- device tokens/s (committed tokens over each device's wall time, averaged);
- tokens per round;
- verifier forward positions per committed token;
- the look-ahead's use and the n-gram/model choice;
- the lossless check of every output against the target's greedy reference.

The chart plots device tokens/s against the round-trip time, one line per strategy.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.lossless import Tally
from bench.metrics import tokens_per_s_per_device
from bench.procs import CorePlan, plan_cores
from bench.runner import devices_ready, release
from bench.target import profile
from bench.workload import DEFAULT_WORKLOAD, Prompt, load
from verifier_server.process import VerifierProcess

STRATEGIES: dict[str, list[str]] = {
    "plain": ["--drafter", "none"],
    "hint": [],
    "fixed": ["--fixed-draft"],
    "adaptive": ["--adaptive"],
    "adaptive+pipelined": ["--adaptive", "--pipelined"],
    "ngram": ["--drafter", "ngram", "--draft-tokens", "64"],  # its tokens are bytes
    "ngram+gguf": ["--drafter", "ngram+{drafter}", "--adaptive"],
}
EDIT_WORKLOAD = Path(__file__).with_name("edit_workload.jsonl")


def _run(strategy: str, n: int, delay_ms: float, prompts: list[Prompt], args: argparse.Namespace,
         verifier: VerifierProcess, work: Path, cores: CorePlan) -> list[list[dict]]:
    flags = [f.format(drafter=args.drafter) for f in STRATEGIES[strategy]]

    def worker(prompts_file: Path) -> list[str]:
        return ["--server", verifier.url, "--prompts", str(prompts_file), "--drafter", args.drafter,
                "--draft-tokens", str(args.draft_tokens), "--max-tokens", str(args.max_tokens),
                "--threads", str(args.drafter_threads), "--network-delay-ms", str(delay_ms),
                "--draft-slowdown", str(args.draft_slowdown), *flags]

    with devices_ready(n, prompts, worker, cores, work) as devices:
        return release(devices)


def _record(strategy: str, n: int, delay_ms: float, results: list[list[dict]], positions: int,
            references: dict) -> dict:
    lines = [line for device in results for line in device]
    committed = sum(len(line["ids"]) for line in lines)
    rounds = sum(line["summary"]["rounds"] for line in lines)
    per_device = tokens_per_s_per_device(results)
    tally = Tally()
    for line in lines:
        tally.add(line["id"], line["ids"], references[line["id"]])
    ahead = [line["summary"]["lookahead"] for line in lines]
    sources: dict[str, int] = {}
    for line in lines:
        for k, v in line["summary"]["sources"].items():
            sources[k] = sources.get(k, 0) + v
    return {
        "strategy": strategy, "n_devices": n, "rtt_ms": delay_ms,
        "device_tokens_per_s": round(float(np.mean(per_device)), 3),
        "tokens_per_round": round(committed / max(rounds, 1), 3),
        "positions_per_token": round(positions / max(committed, 1), 3),
        "draft_acceptance": round(sum(x["summary"]["accepted_draft_tokens"] for x in lines)
                                  / max(sum(x["summary"]["draft_tokens"] for x in lines), 1), 3),
        "lookahead_rounds_share": round(sum(a["rounds"] for a in ahead) / max(rounds, 1), 3),
        "lookahead_used_of_drafted": round(sum(a["used"] for a in ahead) / max(sum(a["drafted"] for a in ahead), 1), 3),
        # rounds sent chained (before the previous answer) and answered, and those whose bet lost
        "chained_rounds_share": round(sum(a["chained"] for a in ahead) / max(rounds, 1), 3),
        "stale_per_round": round(sum(a["stale"] for a in ahead) / max(rounds, 1), 3),
        "sources": sources,
        "lossless_identical": tally.identical, "lossless_near_tie": tally.near_tie,
        "lossless_total": tally.total, "lossless_failures": tally.failures,
    }


def _save(args: argparse.Namespace, prompts: list[Prompt], records: list[dict]) -> None:
    if args.json is None:
        return
    out = {"target": args.target, "drafter": args.drafter, "workload": args.workload.name,
           "emulate_pass_ms": args.emulate_pass_ms, "replay": args.replay, "draft_slowdown_ms": args.draft_slowdown,
           "drafter_threads": args.drafter_threads,
           "max_tokens": args.max_tokens, "prompts": len(prompts), "records": records}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))


def _chart(records: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["n_devices"] for r in records})
    fig, axes = plt.subplots(1, len(ns), figsize=(6 * len(ns), 4.5), squeeze=False)
    for ax, n in zip(axes[0], ns):
        for strategy in STRATEGIES:
            rows = sorted((r["rtt_ms"], r["device_tokens_per_s"]) for r in records
                          if r["strategy"] == strategy and r["n_devices"] == n)
            if rows:
                ax.plot(*zip(*rows), marker="o", label=strategy)
        ax.set(title=f"N = {n}", xlabel="round-trip time (ms)", ylabel="device tokens/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sled-bench strategies", description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--drafter", default="smollm2-135m")
    ap.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    ap.add_argument("--rtt-ms", nargs="+", type=float, default=[0, 20, 80], help="emulated round-trip times")
    ap.add_argument("--n", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per run, shared among its devices")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--draft-tokens", type=int, default=10)
    ap.add_argument("--emulate-pass-ms", type=float, default=250.0,
                    help="the verifier's fixed pass time (GPU-like); 0 for the CPU's own cost")
    ap.add_argument("--draft-slowdown", type=float, default=0.0, metavar="MS", help="sleep per draft step")
    ap.add_argument("--drafter-threads", type=int, default=1,
                    help="each device's drafter threads: 2 emulate a faster board (with --replay the verifier "
                         "leaves the cores to the devices)")
    ap.add_argument("--replay", action="store_true",
                    help="the verifier replays the target's greedy decodings, recorded with the real model, "
                         "instead of running it: passes can then be as short as a GPU's (with "
                         "--emulate-pass-ms 22, an H100's measured pass for the 1.5B)")
    ap.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD,
                    help=f"prompts (JSON lines); the repetitive edit workload is {EDIT_WORKLOAD.name}")
    ap.add_argument("--json", type=Path, help="write the records here (and the chart next to it)")
    args = ap.parse_args(argv)
    prompts = load(args.workload)[: args.prompts]
    cores = plan_cores(max(args.n))
    if args.drafter_threads > 1:  # a faster board: each device's drafter may use every core
        cores = CorePlan(cores.verifier, tuple(sorted({*cores.verifier, *cores.devices})), shared_devices=True)
    print(f"sled-bench strategies: references for {len(prompts)} prompts on {args.target}", file=sys.stderr)
    target = profile(args.target, prompts, args.max_tokens, cores.verifier)
    records = []
    with tempfile.TemporaryDirectory(prefix="sled-strategies-") as tmp:
        work = Path(tmp)
        options = ["--slots", str(max(args.n)), "--ctx-per-slot", str(args.max_tokens + 1024),
                   "--emulate-pass-ms", str(args.emulate_pass_ms), "--no-access-log"]
        if args.replay:
            recordings = work / "recordings.jsonl"
            recordings.write_text("".join(json.dumps({"ids": ids}) + "\n" for ids in target.recordings))
            options += ["--replay", str(recordings)]
        with VerifierProcess(args.target, *options, threads=len(cores.verifier), cores=cores.verifier,
                             log=work / "verifier.log", startup_timeout_s=600) as verifier:
            for n in args.n:
                for delay in args.rtt_ms:
                    for strategy in args.strategies:
                        before = verifier.stats()["positions"]
                        results = _run(strategy, n, delay, prompts, args, verifier, work, cores)
                        rec = _record(strategy, n, delay, results, verifier.stats()["positions"] - before,
                                      target.references)
                        records.append(rec)
                        _save(args, prompts, records)  # as it goes: a long run keeps what it measured
                        print(f"N={n} rtt={delay:g} ms {strategy:20} {rec['device_tokens_per_s']:7.2f} tok/s/device "
                              f"{rec['tokens_per_round']:5.2f} tok/round {rec['positions_per_token']:5.2f} pos/tok "
                              f"lossless {rec['lossless_identical']}+{rec['lossless_near_tie']}/{rec['lossless_total']}",
                              file=sys.stderr, flush=True)
    if args.json is not None:
        _chart(records, args.json.with_suffix(".png"),
               f"{args.drafter} -> {args.target}{' (replayed)' if args.replay else ''}, {args.workload.name}, "
               f"pass {args.emulate_pass_ms:g} ms, "
               f"draft slowdown {args.draft_slowdown:g} ms")
    if any(r["lossless_failures"] for r in records):
        sys.exit("sled-bench strategies: an output broke the lossless rule")


if __name__ == "__main__":
    main()
