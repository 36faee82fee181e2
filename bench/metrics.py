"""From raw measurements to the report's figures: per-run records and the capacity ratios.

Everything "per token" divides by the tokens the devices received (committed target tokens), so
the modes compare on the work they deliver, not on the work they attempt.
"""
from __future__ import annotations

import numpy as np

from bench.gpu_model import GpuModel
from bench.lossless import Tally
from bench.runner import Measurement
from bench.target import TargetProfile

VLLM_COUNTERS = ("cached_tokens", "rounds_read_cache", "cache_resends", "uncertified_rounds", "full_row_rounds")


def _ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None where either side is missing or the denominator is zero."""
    return round(num / den, 6) if num is not None and den else None


def _get(rec: dict | None, key: str) -> float | None:
    return rec.get(key) if rec is not None else None


def _mean(xs: list[float]) -> float | None:
    return round(float(np.mean(xs)), 4) if xs else None


def tokens_per_s_per_device(devices: list[list[dict]]) -> list[float]:
    """Each device's committed tokens over its own generation time."""
    return [sum(len(line["ids"]) for line in d) / sum(line["summary"]["elapsed_s"] for line in d) for d in devices]


def record(pair: str, m: Measurement, target: TargetProfile, gpu: GpuModel) -> dict:
    """The figures of one pair, mode and N (see bench/README.md for each field)."""
    lines = [line for device in m.devices for line in device]
    committed = sum(len(line["ids"]) for line in lines)
    rounds = sum(line["summary"]["rounds"] for line in lines)
    drafted = sum(line["summary"]["draft_tokens"] for line in lines)
    accepted = sum(line["summary"]["accepted_draft_tokens"] for line in lines)
    latencies = [x for line in lines for x in line["round_latencies_s"]]
    per_device = tokens_per_s_per_device(m.devices)
    settings = m.config.settings
    # TLI draws differently from plain seeded sampling (it is exact in distribution, not per seed)
    per_seed = settings.temperature == 0 or settings.sampling == "slem" or m.config.mode == "plain"
    tally = Tally()
    for line in lines if per_seed else []:
        tally.add(line["id"], line["ids"], target.references[line["id"]])
    st = m.stats
    batch_sizes = st.get("batch_sizes")  # llama.cpp's passes; vLLM's steps run out of the verifier's sight
    p50, p95 = np.percentile(latencies, [50, 95]) if latencies else (None, None)
    return {
        "pair": pair,
        "engine": m.config.engine.name,
        "mode": m.config.mode,
        "temperature": settings.temperature,
        "sampling": "greedy" if settings.temperature == 0 else settings.sampling,
        "n_devices": m.config.n_devices,
        "prompts": len(lines),
        "committed_tokens": committed,
        "wall_s": round(m.wall_s, 3),
        "verifier_cpu_s": round(m.verifier_cpu_s, 3),
        "verifier_cpu_s_per_token": _ratio(m.verifier_cpu_s, committed),
        "forward_passes": st.get("forward_passes"),
        "positions": st["positions"],
        "forward_passes_per_token": _ratio(st.get("forward_passes"), committed),
        "positions_per_token": _ratio(st["positions"], committed),
        "rounds": rounds,
        "tokens_per_round": _ratio(committed, rounds),
        "draft_acceptance": _ratio(accepted, drafted),
        "tokens_per_s_total": _ratio(committed, m.wall_s),
        "tokens_per_s_per_device": round(float(np.mean(per_device)), 3),
        "round_latency_p50_s": None if p50 is None else round(float(p50), 6),
        "round_latency_p95_s": None if p95 is None else round(float(p95), 6),
        "lossless_identical": tally.identical,
        "lossless_near_tie": tally.near_tie,
        "lossless_total": tally.total,
        "lossless_failures": tally.failures,
        "round_overhead_ms_p50": st["round_overhead_ms"]["p50"],
        "round_overhead_ms_p95": st["round_overhead_ms"]["p95"],
        "tli_coverage": _mean([line["summary"]["tli_coverage"] for line in lines if line["summary"]["tli_coverage"] is not None]),
        "acceptance_rule_ms_p50": st["acceptance_rule_ms"]["p50"],
        "acceptance_rule_ms_p95": st["acceptance_rule_ms"]["p95"],
        "batch_sizes": batch_sizes,
        "modeled_gpu_s_per_token": _ratio(gpu.replay_s(batch_sizes, target.n_params), committed) if batch_sizes else None,
        "drafts": m.acceptance.get("drafts"),
        "accepted_per_position": m.acceptance.get("accepted_per_position"),
        # the vLLM runner's prefix-cache counters (absent on llama.cpp): see bench/README.md
        **{key: st.get(key) for key in VLLM_COUNTERS},
    }


def capacity(records: list[dict]) -> list[dict]:
    """Per pair and N: how many more devices one verifier serves with drafts than without.

    ``capacity_ratio`` is measured (plain over speculative verifier CPU seconds per token);
    ``modeled_capacity_ratio`` is the GPU model's (plain over fixed modeled seconds per token):
    fixed mode, because the speculative hint tunes draft lengths to this CPU's cost curve, which is
    not the modeled GPU's.
    """
    by_key = {(_engine(r), r["pair"], r["n_devices"], r["mode"]): r for r in records}
    out = []
    for engine, pair, n in dict.fromkeys((_engine(r), r["pair"], r["n_devices"]) for r in records):
        plain, spec, fixed = (by_key.get((engine, pair, n, mode)) for mode in ("plain", "speculative", "fixed"))
        cpu, gpu, tps = "verifier_cpu_s_per_token", "modeled_gpu_s_per_token", "tokens_per_s_total"
        out.append({
            "pair": pair,
            "engine": engine,
            "n_devices": n,
            "capacity_ratio": _ratio(_get(plain, cpu), _get(spec, cpu)),
            "throughput_ratio": _ratio(_get(spec, tps), _get(plain, tps)),
            "modeled_capacity_ratio": _ratio(_get(plain, gpu), _get(fixed, gpu)),
        })
    return out


def _engine(r: dict) -> str:
    return r.get("engine", "llama.cpp")  # records written before the vLLM engine had none
