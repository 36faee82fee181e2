"""One measurement: a fresh verifier, N devices released together, the verifier's CPU time and counters.

The verifier is started anew for every pair, mode and N, so its counters start from zero and its
CPU time is read between the moment all devices are ready (models loaded) and the moment the last
one finishes: start-up, model loading and calibration are left out.
"""
from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.procs import LLAMA_CPP, BenchError, CorePlan, Device, Engine, Verifier
from bench.workload import Prompt, share

MODES = ("speculative", "fixed", "plain")


@dataclass(frozen=True)
class Settings:
    """What every run of one benchmark shares."""

    prompts: tuple[Prompt, ...]  # per N, shared round-robin among its devices
    max_tokens: int
    draft_tokens: int
    network_delay_ms: float
    temperature: float = 0.0  # 0: greedy; above, each prompt samples with its own seed
    sampling: str = "slem"  # how sampled sessions draft: "slem" or "tli"


@dataclass(frozen=True)
class RunConfig:
    target: str
    drafter: str  # ignored in plain mode
    mode: str
    n_devices: int
    settings: Settings
    engine: Engine = LLAMA_CPP  # the verifier's


@dataclass
class Measurement:
    config: RunConfig
    verifier_cpu_s: float
    wall_s: float
    stats: dict  # GET /v1/stats after the run
    devices: list[list[dict]]  # per device, the worker's per-prompt lines
    # from /metrics: rounds with a draft, draft tokens, and rounds that accepted position j (0-based)
    acceptance: dict = field(default_factory=dict)


def _worker_args(config: RunConfig, prompts_file: Path, server: str) -> list[str]:
    s = config.settings
    args = [
        "--server", server,
        "--prompts", str(prompts_file),
        "--drafter", config.drafter if config.mode != "plain" else "none",
        "--draft-tokens", str(s.draft_tokens),
        "--max-tokens", str(s.max_tokens),
        "--threads", "1",
        "--network-delay-ms", str(s.network_delay_ms),
        "--temperature", str(s.temperature),
        "--sampling", s.sampling,
    ]  # fmt: skip
    return args + ["--fixed-draft"] if config.mode == "fixed" else args


@contextlib.contextmanager
def devices_ready(n: int, prompts: list[Prompt], worker_args: Callable[[Path], list[str]], cores: CorePlan,
                  log_dir: Path) -> Iterator[list[Device]]:
    """N ``bench.worker`` processes, each with its share of ``prompts`` (``worker_args`` of its
    prompts file), loaded and waiting to be released; stopped on leaving."""
    if n > len(prompts):
        raise BenchError(f"{n} devices need at least as many prompts (got {len(prompts)})")
    devices = []
    try:
        for i in range(n):
            prompts_file = log_dir / f"device{i}.jsonl"
            prompts_file.write_text("".join(json.dumps(p.to_json()) + "\n" for p in share(prompts, n, i)))
            devices.append(Device(worker_args(prompts_file), cores.device_cores(i), log_dir / f"device{i}.log"))
        for d in devices:
            d.wait_ready()
        yield devices
    finally:
        for d in devices:
            d.stop()


def release(devices: list[Device]) -> list[list[dict]]:
    """Start every device at once; per device, its per-prompt lines once all have finished."""
    for d in devices:
        d.go()
    return [d.results() for d in devices]


def run(config: RunConfig, cores: CorePlan) -> Measurement:
    """Run ``config`` end to end with real processes; logs live in a temporary folder meanwhile."""
    with tempfile.TemporaryDirectory(prefix="sled-bench-") as tmp:
        log_dir = Path(tmp)
        max_tokens = config.settings.max_tokens
        with Verifier(config.target, config.n_devices, max_tokens, cores.verifier, log_dir,
                      config.engine) as verifier, \
                devices_ready(config.n_devices, list(config.settings.prompts),
                              lambda f: _worker_args(config, f, verifier.url), cores, log_dir) as devices:
            cpu0, t0 = verifier.cpu_seconds(), time.perf_counter()
            results = release(devices)
            wall = time.perf_counter() - t0
            cpu = verifier.cpu_seconds() - cpu0
            return Measurement(config, cpu, wall, verifier.stats(), results, acceptance(verifier.url))


_SAMPLE = re.compile(r'^sled:spec_decode_num_(drafts|draft_tokens|accepted_tokens_per_pos)(?:_total)?'
                     r'(?:\{position="(\d+)"\})? ([0-9.eE+-]+)$')


def acceptance(url: str) -> dict:
    """The run's acceptance lengths from the verifier's ``/metrics``: ``drafts`` (rounds with a
    draft), ``draft_tokens`` and ``accepted_per_position`` (rounds whose draft was accepted at least
    up to position j; acceptance is a prefix, so these counts give the distribution of accepted
    lengths per round: what ``bench/gpu/vllm_capacity.py`` replays)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict = {"drafts": 0, "draft_tokens": 0, "accepted_per_position": []}
    per_pos: dict[int, int] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, pos, value = m.group(1), m.group(2), int(float(m.group(3)))
        if name == "accepted_tokens_per_pos" and pos is not None:
            per_pos[int(pos)] = value
        elif name in ("drafts", "draft_tokens"):
            out[name] = value
    out["accepted_per_position"] = [per_pos.get(j, 0) for j in range(max(per_pos, default=-1) + 1)]
    return out
