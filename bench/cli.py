"""``sled-bench``: the verifier's capacity with and without drafts, measured on real processes.

For every pair (drafter->target), N and mode it starts a fresh verifier and N device processes,
releases the devices together, and reports the verifier's CPU seconds, forward passes and positions
per committed token, throughput, round latency and the lossless check of every output; then the
capacity ratio (plain over speculative cost per token) and a GPU-modeled one. The default is a
quick run (about 10 minutes on two cores); ``--full`` runs the whole grid. ``sled-bench soak``
runs hundreds of simulated devices against one verifier for a long time (bench/soak.py);
``sled-bench strategies`` compares the device's drafting strategies over network delays
(bench/strategies.py). ``--engines llama.cpp vllm`` runs every measurement on both verifier
engines (vLLM from its own environment, ``.venv-vllm``), side by side in one report.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import report
from bench.gpu_model import GpuModel
from bench.metrics import capacity, record
from bench.procs import ENGINES, LLAMA_CPP, VLLM_CPU_OPTIONS, VLLM_PYTHON, BenchError, CorePlan, Engine, plan_cores
from bench.runner import MODES, Measurement, RunConfig, Settings, run
from bench.target import TargetProfile, profile, vllm_references
from bench.workload import DEFAULT_WORKLOAD, Prompt, load
from edge_agent.agent import DEFAULT_DRAFT_TOKENS
from shared.models import ModelError, resolve
from shared.sampling import Sampling
from verifier_server.process import LaunchError

PAIRS = (
    "smollm2-135m->qwen2.5-coder-1.5b",
    "gemma-3-270m->qwen2.5-coder-1.5b",
    "qwen2.5-coder-0.5b->qwen2.5-coder-1.5b",
)
QUICK: dict[str, Any] = {"pairs": PAIRS, "n": (1, 4), "prompts": 4, "max_tokens": 64}
FULL: dict[str, Any] = {"pairs": PAIRS, "n": (1, 2, 4, 8), "prompts": 24, "max_tokens": 128}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sled-bench", description=__doc__)
    ap.add_argument("--full", action="store_true", help="3 pairs, N in 1 2 4 8, 24 prompts, 128 tokens")
    ap.add_argument("--pairs", nargs="+", metavar="DRAFTER->TARGET", help="registry names or GGUF paths")
    ap.add_argument("--n", nargs="+", type=int, metavar="N", help="device counts")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--prompts", type=int, help="prompts per N, shared among its devices")
    ap.add_argument("--max-tokens", type=int, help="new tokens per prompt (greedy)")
    ap.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS,
                    help="fixed mode's draft length, and speculative mode's cap on the hint")  # fmt: skip
    ap.add_argument("--network-delay-ms", type=float, default=0.0, help="emulated extra time per round trip")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy; above, every prompt samples with its own fixed seed")
    ap.add_argument("--sampling", choices=("slem", "tli"), default="slem", help="how sampled sessions draft")
    ap.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="prompts, one JSON object a line")
    ap.add_argument("--kind", choices=("code", "chat"), help="only raw code prompts, or only chats")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=["llama.cpp"],
                    help="verifier engines, each measured at every pair, mode and N (vllm: a converted target)")
    ap.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="the vLLM environment's interpreter")
    ap.add_argument("--vllm-options", default=shlex.join(VLLM_CPU_OPTIONS),
                    help="extra sled-verifier serve options of the vLLM verifier (default: a CPU build's)")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--chart", type=Path, help="PNG chart (default: next to --json)")
    return ap


def _split_pair(pair: str) -> tuple[str, str]:
    drafter, sep, target = pair.partition("->")
    if not sep or not drafter or not target:
        raise ModelError(f"a pair is DRAFTER->TARGET, not '{pair}' (quote it: '>' is a shell redirection)")
    return drafter, target


def _log(message: str) -> None:
    print(f"sled-bench: {message}", file=sys.stderr, flush=True)


class _Grid:
    """The runs of one benchmark, in an order that loads each target once and shares plain runs.

    A plain run involves no drafter, so one plain run per target and N serves every pair with that
    target; its record is repeated under each pair.
    """

    def __init__(
        self, pairs: list[str], ns: list[int], modes: list[str], settings: Settings, cores: CorePlan,
        engines: list[Engine] | None = None,
    ) -> None:
        self.ns, self.modes, self.settings, self.cores = ns, modes, settings, cores
        self.engines = engines or [LLAMA_CPP]
        self.pairs = {p: _split_pair(p) for p in pairs}  # "drafter->target" -> (drafter, target)
        self.targets = list(dict.fromkeys(target for _, target in self.pairs.values()))
        drafter_modes = [m for m in modes if m != "plain"]
        self.total = len(self.engines) * len(ns) * (len(pairs) * len(drafter_modes) + len(self.targets) * ("plain" in modes))
        self.done = 0

    def _run(self, target: str, drafter: str, mode: str, n: int, engine: Engine) -> Measurement:
        config = RunConfig(target, drafter, mode, n, self.settings, engine)
        t0 = time.perf_counter()
        m = run(config, self.cores)
        self.done += 1
        who = target if mode == "plain" else f"{drafter}->{target}"
        _log(f"[{self.done}/{self.total}] {who} {mode} N={n} ({engine.name}): {time.perf_counter() - t0:.0f} s")
        return m

    def _profile(self, prof: TargetProfile, engine: Engine) -> TargetProfile:
        """``prof`` with the references of ``engine``: vLLM's float weights decode on their own."""
        if engine.name == "llama.cpp":
            return prof
        t0 = time.perf_counter()
        s = self.settings
        refs = vllm_references(prof, list(s.prompts), s.max_tokens, self.cores.verifier, engine, Sampling(s.temperature))
        _log(f"{prof.name}: vLLM references in {time.perf_counter() - t0:.0f} s")
        return dataclasses.replace(prof, references=refs)

    def records(self, gpu: GpuModel) -> tuple[list[dict], list[TargetProfile]]:
        records, profiles = [], []
        for target in self.targets:
            t0 = time.perf_counter()
            prof = profile(target, list(self.settings.prompts), self.settings.max_tokens, self.cores.verifier,
                           Sampling(self.settings.temperature))
            profiles.append(prof)
            _log(f"{target}: references and cost curve in {time.perf_counter() - t0:.0f} s")
            for engine in self.engines:
                engine_prof = self._profile(prof, engine)
                for n in self.ns:
                    plain = self._run(target, "none", "plain", n, engine) if "plain" in self.modes else None
                    for pair, (drafter, pair_target) in self.pairs.items():
                        if pair_target != target:
                            continue
                        for mode in self.modes:
                            m = (plain if plain is not None and mode == "plain"
                                 else self._run(target, drafter, mode, n, engine))
                            records.append(record(pair, m, engine_prof, gpu))
        order = {p: i for i, p in enumerate(self.pairs)}
        engines = [e.name for e in self.engines]
        records.sort(key=lambda r: (order[r["pair"]], r["n_devices"], engines.index(r["engine"]),
                                    MODES.index(r["mode"])))
        return records, profiles


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    preset = FULL if args.full else QUICK
    pairs = list(args.pairs or preset["pairs"])
    ns = sorted(set(args.n or preset["n"]))
    n_prompts = args.prompts or preset["prompts"]
    max_tokens = args.max_tokens or preset["max_tokens"]
    for name in {x for p in pairs for x in _split_pair(p)}:
        resolve(name)  # fail now, with the install hint, rather than in a subprocess later
    workload = [p for p in load(args.workload) if args.kind is None or p.kind == args.kind]
    if not max(ns) <= n_prompts <= len(workload):
        raise BenchError(f"--prompts must lie between the largest N ({max(ns)}) and {len(workload)}")
    prompts: tuple[Prompt, ...] = tuple(workload[:n_prompts])
    cores = plan_cores(max(ns))
    _log(cores.describe())
    settings = Settings(prompts, max_tokens, args.draft_tokens, args.network_delay_ms, args.temperature, args.sampling)
    gpu = GpuModel()
    engines = [LLAMA_CPP if name == "llama.cpp" else Engine(name, args.vllm_python, tuple(shlex.split(args.vllm_options)))
               for name in dict.fromkeys(args.engines)]
    records, profiles = _Grid(pairs, ns, args.modes, settings, cores, engines).records(gpu)
    caps = capacity(records)
    print(report.table(records, caps))
    document = {
        "machine": report.machine(cores),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["sled-bench", *argv]),
        "settings": {
            "pairs": pairs,
            "modes": args.modes,
            "n_devices": ns,
            "prompts": [p.id for p in prompts],
            "max_tokens": max_tokens,
            "draft_tokens": args.draft_tokens,
            "network_delay_ms": args.network_delay_ms,
            "temperature": args.temperature,
            "sampling": args.sampling,
            "engines": [{"name": e.name, "python": e.python, "options": list(e.options)} for e in engines],
        },
        "records": records,
        "capacity": caps,
        "cost_curve": [{**point, "target": prof.name} for prof in profiles for point in prof.cost_curve],
        "gpu_model": gpu.describe({prof.name: prof.n_params for prof in profiles}),
    }
    if args.json:
        report.write_json(args.json, document)
        _log(f"wrote {args.json}")
    chart = args.chart or (args.json.with_suffix(".png") if args.json else None)
    if chart:
        report.chart(chart, records, caps)
        _log(f"wrote {chart}")
    failures = sum(len(r["lossless_failures"]) for r in records)
    if failures:
        _log(f"{failures} output(s) diverged from the greedy reference away from a near tie")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["soak"]:  # the long-running fleet test (bench/soak.py)
            from bench.soak import main as soak

            return soak(argv[1:])
        if argv[:1] == ["scrape"]:  # what scraping /v1/stats and /metrics costs the rounds (bench/scrape.py)
            from bench.scrape import main as scrape

            return scrape(argv[1:])
        if argv[:1] == ["strategies"]:  # device-side drafting strategies (bench/strategies.py)
            from bench.strategies import main as strategies

            return strategies(argv[1:])
        args = _parser().parse_args(argv)
        sys.exit(_bench(args, argv))
    except (ModelError, BenchError, LaunchError) as e:
        sys.exit(f"sled-bench: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
