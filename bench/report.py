"""The benchmark's outputs: a short table on stdout, the JSON document and the chart."""
from __future__ import annotations

import json
import os
import platform
from importlib.metadata import version
from pathlib import Path

from bench.procs import CorePlan

MODELED = "modeled A100"  # the label of every figure that comes from bench.gpu_model


def machine(cores: CorePlan) -> dict:
    """Where the figures were measured: they only compare with figures from the same machine."""
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                    if ln.startswith("model name")), cpu)  # fmt: skip
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores_available": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "llama_cpp_python": version("llama-cpp-python"),
        "verifier_cores": list(cores.verifier),
        "device_cores": list(cores.devices),
        "dedicated_device_cores": cores.dedicated,
    }


def _fmt(x: float | None, digits: int = 3, scale: float = 1.0) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def _lossless(r: dict) -> str:
    if not r["lossless_total"]:
        return "in dist."  # TLI: exact in distribution, not per seed
    return f"{r['lossless_identical']}+{r['lossless_near_tie']}/{r['lossless_total']}"


# (header, width, cell): the record table's columns; lossless is identical+near-tie/total.
_COLUMNS = (
    ("pair", -40, lambda r: r["pair"]),
    ("engine", -9, lambda r: r.get("engine", "llama.cpp")),
    ("mode", -11, lambda r: r["mode"]),
    ("N", 2, lambda r: str(r["n_devices"])),
    ("cpu s/tok", 9, lambda r: _fmt(r["verifier_cpu_s_per_token"], 4)),
    ("fwd/tok", 7, lambda r: _fmt(r["forward_passes_per_token"])),
    ("pos/tok", 7, lambda r: _fmt(r["positions_per_token"])),
    ("tok/rnd", 7, lambda r: _fmt(r["tokens_per_round"], 2)),
    ("accept", 6, lambda r: _fmt(r["draft_acceptance"], 2)),
    ("tok/s", 6, lambda r: _fmt(r["tokens_per_s_total"], 1)),
    ("/dev", 6, lambda r: _fmt(r["tokens_per_s_per_device"], 1)),
    ("p50 ms", 7, lambda r: _fmt(r["round_latency_p50_s"], 1, 1e3)),
    ("p95 ms", 7, lambda r: _fmt(r["round_latency_p95_s"], 1, 1e3)),
    ("ovh p50", 7, lambda r: _fmt(r["round_overhead_ms_p50"], 2)),
    ("ovh p95", 7, lambda r: _fmt(r["round_overhead_ms_p95"], 2)),
    ("rule ms", 7, lambda r: _fmt(r["acceptance_rule_ms_p50"], 2)),
    ("lossless", 9, _lossless),
)


def _row(cells: list[str]) -> str:
    return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, (_, w, _) in zip(cells, _COLUMNS))


def table(records: list[dict], capacity: list[dict]) -> str:
    head = _row([h for h, _, _ in _COLUMNS])
    rows = [head, "-" * len(head)] + [_row([cell(r) for _, _, cell in _COLUMNS]) for r in records]
    rows += ["", f"{'pair':40} {'engine':9} {'N':>2} {'capacity ratio':>14} {'tok/s ratio':>11} "
                 f"{MODELED + ' ratio':>18}"]
    for c in capacity:
        rows.append(
            f"{c['pair']:40} {c.get('engine', 'llama.cpp'):9} {c['n_devices']:>2} {_fmt(c['capacity_ratio'], 2):>14} "
            f"{_fmt(c.get('throughput_ratio'), 2):>11} {_fmt(c['modeled_capacity_ratio'], 2):>18}"
        )
    cached = [r for r in records if r.get("cached_tokens") is not None]
    if cached:  # the vLLM runner's prefix-cache counters
        rows += ["", f"{'pair':40} {'mode':11} {'N':>2} {'rounds':>6} {'computed':>8} {'cached':>8} "
                     f"{'read cache':>10} {'resends':>7} {'uncert.':>7} {'full rows':>9}"]
        for r in cached:
            rows.append(f"{r['pair']:40} {r['mode']:11} {r['n_devices']:>2} {r['rounds']:>6} {r['positions']:>8} "
                        f"{r['cached_tokens']:>8} {r['rounds_read_cache']:>10} {r['cache_resends']:>7} "
                        f"{r['uncertified_rounds']:>7} {r['full_row_rounds']:>9}")
    for r in records:
        for f in r["lossless_failures"]:
            rows.append(f"LOSSLESS FAILURE {r['pair']} {r['mode']} N={r['n_devices']}: {f}")
    return "\n".join(rows)


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def chart(path: Path, records: list[dict], capacity: list[dict]) -> None:
    """Capacity ratio (measured, and modeled dashed) and total tokens/s against N, a line per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a line per pair and engine: vLLM's are labelled "PAIR (vllm)"
    capacity = [{**c, "pair": _label(c)} for c in capacity]
    records = [{**r, "pair": _label(r)} for r in records]
    pairs = list(dict.fromkeys(c["pair"] for c in capacity))
    colors = {p: plt.get_cmap("tab10")(i) for i, p in enumerate(pairs)}
    ns = sorted({r["n_devices"] for r in records})
    fig, (ax_cap, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.8))
    for p in pairs:
        rows = [c for c in capacity if c["pair"] == p]
        _line(ax_cap, rows, "capacity_ratio", f"{p} (CPU, speculative)", colors[p], "-")
        _line(ax_cap, rows, "modeled_capacity_ratio", f"{p} ({MODELED}, fixed)", colors[p], "--", "s")
        spec = [r for r in records if r["pair"] == p and r["mode"] == "speculative"]
        _line(ax_tps, spec, "tokens_per_s_total", f"{p} speculative", colors[p], "-")
    for target in dict.fromkeys(p.split("->")[1] for p in pairs):
        first = next(p for p in pairs if p.endswith("->" + target))
        plain = [r for r in records if r["pair"] == first and r["mode"] == "plain"]
        _line(ax_tps, plain, "tokens_per_s_total", f"{target} plain", "gray", ":")
    ax_cap.axhline(1.0, color="black", linewidth=0.6)
    ax_cap.set(title="Capacity ratio: plain / drafted cost per token", ylabel="capacity ratio")
    ax_tps.set(title="Committed tokens/s, all devices", ylabel="tokens/s")
    for ax in (ax_cap, ax_tps):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("devices (N)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _label(r: dict) -> str:
    engine = r.get("engine", "llama.cpp")
    return r["pair"] if engine == "llama.cpp" else f"{r['pair']} ({engine})"


def _line(ax, rows: list[dict], key: str, label: str, color, style: str, marker: str = "o") -> None:
    points = [(r["n_devices"], r[key]) for r in rows if r.get(key) is not None]
    if points:
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, style, marker=marker, color=color, label=label)
