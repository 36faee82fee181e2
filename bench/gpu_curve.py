"""Measure the cost curve t(B) of a target-shaped model on a CUDA GPU, for the capacity replay.

The machines a GPU is lent on cannot install the project's models (no package registry there), so
this measures what the capacity model needs from the hardware: the wall time of one forward pass of
B new tokens, logits at every position, after a context of ``--context`` tokens, for a model with
Qwen2.5-Coder-1.5B's architecture (random bf16 weights: the time does not depend on their values).
It runs with torch and transformers (the ``torch`` extra), in eager mode: a serving engine with CUDA
graphs has less per-pass overhead, so this curve is an upper bound on the fixed cost.

    python -m bench.gpu_curve --json gpu_curve.json

``python -m bench.replay RESULTS.json gpu_curve.json`` then replays a benchmark's recorded passes
through it.
"""
from __future__ import annotations

import argparse
import json
import time

SIZES = (1, 2, 4, 8, 16, 32, 64, 128)

# Qwen2.5-Coder-1.5B-Instruct's architecture (config.json of the published model).
QWEN25_15B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)


def measure(context: int, repeats: int) -> dict:
    import torch
    from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_15B)
    model = Qwen2ForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (1, context + max(SIZES)), device="cuda")
    curve = []
    with torch.inference_mode():
        cache = DynamicCache()
        model(ids[:, :context], past_key_values=cache, use_cache=True)
        for b in SIZES:
            times = []
            for i in range(repeats + 3):  # the first passes of a shape warm up kernels and allocator
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(ids[:, context : context + b], past_key_values=cache, use_cache=True)
                torch.cuda.synchronize()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
                cache.crop(-b)
            times.sort()
            curve.append({"tokens": b, "seconds": round(times[len(times) // 2], 6)})
    return {
        "device": torch.cuda.get_device_name(0),
        "model": "Qwen2.5-Coder-1.5B architecture, random bf16 weights, transformers eager",
        "params": params,
        "context": context,
        "torch": torch.__version__,
        "cost_curve": curve,
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_curve", description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=256, help="tokens already in the KV cache")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", required=True, help="write the curve here")
    args = ap.parse_args()
    result = measure(args.context, args.repeats)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    for p in result["cost_curve"]:
        print(f"B={p['tokens']:4d}  {p['seconds'] * 1000:8.3f} ms")


if __name__ == "__main__":
    main()
