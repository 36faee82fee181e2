"""One measurement: a fresh verifier, N devices released together, the verifier's CPU time and counters.

The verifier is started anew for every pair, mode and N, so its counters start from zero and its
CPU time is read between the moment all devices are ready (models loaded) and the moment the last
one finishes: start-up, model loading and calibration are left out.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError, CorePlan, Device, Verifier
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


@dataclass
class Measurement:
    config: RunConfig
    verifier_cpu_s: float
    wall_s: float
    stats: dict  # GET /v1/stats after the run
    devices: list[list[dict]]  # per device, the worker's per-prompt lines


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


def run(config: RunConfig, cores: CorePlan) -> Measurement:
    """Run ``config`` end to end with real processes; logs live in a temporary folder meanwhile."""
    prompts = list(config.settings.prompts)
    if config.n_devices > len(prompts):
        raise BenchError(f"{config.n_devices} devices need at least as many prompts (got {len(prompts)})")
    with tempfile.TemporaryDirectory(prefix="sled-bench-") as tmp:
        log_dir = Path(tmp)
        max_tokens = config.settings.max_tokens
        with Verifier(config.target, config.n_devices, max_tokens, cores.verifier, log_dir) as verifier:
            devices = []
            try:
                for i in range(config.n_devices):
                    prompts_file = log_dir / f"device{i}.jsonl"
                    mine = share(prompts, config.n_devices, i)
                    prompts_file.write_text("".join(json.dumps(p.to_json()) + "\n" for p in mine))
                    args = _worker_args(config, prompts_file, verifier.url)
                    devices.append(Device(args, cores.device_core(i), log_dir / f"device{i}.log"))
                for d in devices:
                    d.wait_ready()
                cpu0, t0 = verifier.cpu_seconds(), time.perf_counter()
                for d in devices:
                    d.go()
                results = [d.results() for d in devices]
                wall = time.perf_counter() - t0
                cpu = verifier.cpu_seconds() - cpu0
                return Measurement(config, cpu, wall, verifier.stats(), results)
            finally:
                for d in devices:
                    d.stop()
