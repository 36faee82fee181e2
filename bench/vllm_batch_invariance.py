"""Are a verify round's rows bit-identical to one-token-at-a-time rows on vLLM?

A round scores the committed ids plus the candidates in one request and reads the candidate rows
from ``prompt_logprobs``; plain decoding reads each row as the generated token's ``logprobs`` of a
request that computes one new position over the prefix cache. The two shapes run different GEMM
and attention shapes, so their floats may round differently: this measures how far apart they are,
with vLLM's batch-invariant mode (``VLLM_BATCH_INVARIANT=1``) on or off.

    .venv-vllm/bin/python -m bench.vllm_batch_invariance --model ~/.cache/sled/hf/qwen2.5-coder-0.5b
    VLLM_BATCH_INVARIANT=1 .venv-vllm/bin/python -m bench.vllm_batch_invariance --model ...

It prints one JSON object: per compared position whether the top-K ids and their log-probabilities
are identical, the largest difference, and whether the best id agrees.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from typing import Any


def _top(row: dict[int, Any], k: int) -> dict[int, float]:
    """The ``k`` best ids of a vLLM logprobs row (the scored token's own entry, which vLLM adds
    whatever its rank, is left out unless it ranks among them)."""
    return {i: lp.logprob for i, lp in row.items() if lp.rank is not None and lp.rank <= k}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.vllm_batch_invariance", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face directory (sled-verifier models convert NAME)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=16, help="positions compared (a round's candidates)")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=os.path.expanduser(args.model), skip_tokenizer_init=True, dtype=args.dtype, max_model_len=1024,
              max_num_seqs=8, enable_prefix_caching=True, max_logprobs=-1, block_size=32, enforce_eager=True,
              kv_cache_memory_bytes=1 << 30, seed=0)  # fmt: skip
    rng = random.Random(0)
    prompt = [rng.randrange(100, 30000) for _ in range(args.prompt_tokens)]
    greedy = SamplingParams(max_tokens=args.tokens, temperature=0.0, detokenize=False)
    cont = list(llm.generate(TokensPrompt(prompt_token_ids=prompt), greedy)[0].outputs[0].token_ids)
    seq = prompt + cont  # the target's own continuation: rows along a greedy path, as verification reads
    k = args.top_k
    # a round: every row from one request, prefix not cached
    llm.reset_prefix_cache()
    one = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, prompt_logprobs=k, logprobs=k,
                         skip_reading_prefix_cache=True)
    out = llm.generate(TokensPrompt(prompt_token_ids=seq), one)[0]
    round_rows = [_top(out.prompt_logprobs[i], k) for i in range(len(prompt), len(seq))]
    # plain decoding: row i as the generated row after seq[:i], one request per position over the cache
    step = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, logprobs=k)
    step_rows = []
    for i in range(len(prompt), len(seq)):
        o = llm.generate(TokensPrompt(prompt_token_ids=seq[:i]), step)[0]
        step_rows.append(_top(o.outputs[0].logprobs[0], k))
    positions = []
    for a, b in zip(round_rows, step_rows):
        common = set(a) & set(b)
        positions.append({
            "identical": a == b,
            "same_top_ids": set(a) == set(b),
            "same_best": max(a, key=a.__getitem__) == max(b, key=b.__getitem__),
            "max_abs_diff": max((abs(a[i] - b[i]) for i in common), default=None),
        })
    diffs = [p["max_abs_diff"] for p in positions if p["max_abs_diff"] is not None]
    print(json.dumps({
        "batch_invariant": os.environ.get("VLLM_BATCH_INVARIANT", "0") == "1",
        "dtype": args.dtype,
        "positions": len(positions),
        "identical_rows": sum(p["identical"] for p in positions),
        "same_best_id": sum(p["same_best"] for p in positions),
        "max_abs_logprob_diff": max(diffs, default=None),
        "per_position": positions,
    }))


if __name__ == "__main__":
    main()
