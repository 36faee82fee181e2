"""Replay a benchmark's recorded forward passes through a cost curve measured on a GPU.

``sled-bench`` records the size of every forward pass the verifier ran (``batch_sizes``). Pricing
them with a GPU's measured t(B) (``python -m bench.gpu_curve``) instead of the roofline model gives
the capacity ratio on that GPU's cost curve: plain over fixed GPU seconds per committed token.

    python -m bench.replay bench/results/quick.json bench/gpu_curve_h100.json
"""
from __future__ import annotations

import argparse
import json

from verifier_server.cost_curve import CostCurve


def gpu_s_per_token(record: dict, curve: CostCurve) -> float:
    seconds = sum(count * curve(int(b)) for b, count in record["batch_sizes"].items())
    return seconds / record["committed_tokens"]


def replay(bench: dict, curve: CostCurve) -> list[dict]:
    """Per pair and N: the capacity ratio on the measured curve (fixed mode, as the model's)."""
    by_key = {(r["pair"], r["n_devices"], r["mode"]): r for r in bench["records"]}
    rows = []
    for pair, n in dict.fromkeys((r["pair"], r["n_devices"]) for r in bench["records"]):
        plain, fixed = by_key.get((pair, n, "plain")), by_key.get((pair, n, "fixed"))
        if plain and fixed:
            ratio = gpu_s_per_token(plain, curve) / gpu_s_per_token(fixed, curve)
            rows.append({"pair": pair, "n_devices": n, "measured_curve_capacity_ratio": round(ratio, 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n")[0])
    ap.add_argument("bench_json", help="a sled-bench --json file")
    ap.add_argument("curve_json", help="a python -m bench.gpu_curve --json file")
    args = ap.parse_args()
    with open(args.bench_json) as f:
        bench = json.load(f)
    with open(args.curve_json) as f:
        measured = json.load(f)
    curve = CostCurve({p["tokens"]: p["seconds"] for p in measured["cost_curve"]})
    print(f"forward passes priced with the cost curve measured on {measured['device']} ({measured['model']})")
    print(f"{'pair':40} {'N':>2} capacity ratio")
    for row in replay(bench, curve):
        print(f"{row['pair']:40} {row['n_devices']:2d} {row['measured_curve_capacity_ratio']:14.2f}")


if __name__ == "__main__":
    main()
