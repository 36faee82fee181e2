"""vLLM's capacity with and without drafts on a CUDA GPU: committed tokens per GPU-second.

The GPU machines here reach no package registry and no model hub, so, as ``bench.gpu_curve`` does,
this writes the config of Qwen2.5-Coder-1.5B's published architecture into a directory and lets
vLLM fill it with random weights (``load_format="dummy"``): the time of a step does not depend on
the weights' values. It needs a CUDA build of vLLM already installed there.

Random weights make the model's own acceptance meaningless, so recorded acceptance drives the
speculative rounds: the distribution of accepted lengths per round that a real run measured
(``sled-bench --json``: a record's ``drafts`` and ``accepted_per_position``, from the verifier's
``/metrics``), or, without one, the assumed distribution below. Every stream replays rounds as the vLLM runner
(``verifier_server/vllm/runner.py``) sends them: one request per round of the committed ids plus k
candidates, ``max_tokens=1``, the top-K log-probabilities of the prompt rows and of the generated
row, over vLLM's prefix cache (a round whose cache hit reaches the rows it needs is sent again
without the cache). The recorded accepted count decides how many candidates commit, plus the one
token of the round.

The baselines, N streams each:
- ``plain``: vLLM's own decoding, one request of ``max_tokens=T`` per stream (no logprobs):
  what plain serving of the target costs; the capacity ratio divides by this one;
- ``plain-rounds``: one request per token through the runner's round path (k = 0), as sled's plain
  mode on the vLLM engine does.

For N in 1, 4, 16, 64 it measures the wall time of each mode's phase (the GPU is busy with nothing
else) and reports committed tokens per GPU-second and the ratio speculative / plain:

    python -m bench.gpu.vllm_capacity --json vllm_capacity_h100.json            # on the GPU machine
    python -m bench.gpu.vllm_capacity --acceptance bench/results/b.json --json out.json
    .venv-vllm/bin/python -m bench.gpu.vllm_capacity --smoke                   # CPU, tiny, minutes
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.gpu_curve import QWEN25_15B

NS = (1, 4, 16, 64)
TOP_K = 20  # the runner's default --top-k-rows
BLOCK_SIZE = 32

# Qwen2.5-Coder-1.5B's config.json fields beyond bench.gpu_curve's (the published model's values).
QWEN2_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 28,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
    **QWEN25_15B,
}
# --smoke: a tiny model of the same family, to check the script on a CPU build of vLLM.
SMOKE_CONFIG: dict[str, Any] = {
    **QWEN2_CONFIG,
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,  # head_dim 64
    "num_key_value_heads": 2, "vocab_size": 4096, "max_window_layers": 2, "torch_dtype": "float32",
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip

# The built-in distribution, used without --acceptance: an assumption, not a recording. k = 10 and
# each position accepted with probability 0.75 given the one before (3.8 committed tokens per
# round); replay a measured one with --acceptance RESULTS.json (sled-bench writes the counts).
DEFAULT_ACCEPTANCE: dict[str, Any] = {"draft_tokens_per_round": 10, "drafts": 100,
                                      "accepted_per_position": [75, 56, 42, 32, 24, 18, 13, 10, 8, 6]}


@dataclass(frozen=True)
class Replay:
    """Accepted lengths per round, to draw from: ``weights[a]`` rounds accepted exactly ``a``."""

    k: int
    weights: list[int]

    @classmethod
    def from_counts(cls, k: int, drafts: int, at_least: list[int]) -> Replay:
        at_least = [drafts, *at_least[:k]] + [0] * (k - len(at_least[:k]))
        return cls(k, [max(at_least[a] - at_least[a + 1], 0) for a in range(k)] + [at_least[k]])

    def mean_tokens_per_round(self) -> float:
        return sum((a + 1) * w for a, w in enumerate(self.weights)) / sum(self.weights)

    def draw(self, rng: random.Random) -> int:
        return rng.choices(range(self.k + 1), self.weights)[0]


def load_replay(path: str | None, pair: str | None, k: int | None) -> Replay:
    """The recording: built in, or a ``sled-bench --json``'s record (fixed mode, else speculative)
    with the most drafts, of ``pair`` if given."""
    if path is None:
        d = DEFAULT_ACCEPTANCE
        return Replay.from_counts(k or d["draft_tokens_per_round"], d["drafts"], d["accepted_per_position"])
    doc = json.loads(Path(path).read_text())
    recs = [r for r in doc["records"] if r.get("drafts") and (pair is None or r["pair"] == pair)]
    if not recs:
        raise SystemExit(f"{path}: no record with acceptance counts (sled-bench writes them since the vLLM engine)")
    rec = max(recs, key=lambda r: (r["mode"] == "fixed", r["drafts"]))
    draft_k = k or (doc["settings"]["draft_tokens"] if rec["mode"] == "fixed"
                    else round(rec.get("draft_tokens", 0) / rec["drafts"]) or doc["settings"]["draft_tokens"])
    return Replay.from_counts(draft_k, rec["drafts"], rec["accepted_per_position"])


def write_model_dir(config: dict[str, Any]) -> str:
    """A directory vLLM loads with ``load_format="dummy"``: config.json alone (ids in, no tokenizer)."""
    out = Path(tempfile.mkdtemp(prefix="sled-vllm-arch-"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return str(out)


class Streams:
    """N concurrent streams of one mode against one AsyncLLM."""

    def __init__(self, llm: Any, vocab: int, prompt_len: int, max_tokens: int, replay: Replay, seed: int) -> None:
        self.llm, self.vocab, self.prompt_len, self.max_tokens, self.replay = llm, vocab, prompt_len, max_tokens, replay
        self.rng = random.Random(seed)
        self.requests = self.resends = self.cached = self.computed = 0

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(10, self.vocab) for _ in range(n)]

    async def _request(self, tokens: list[int], params: Any) -> Any:
        from vllm.inputs import TokensPrompt

        final = None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=tokens), params, request_id=uuid.uuid4().hex):
            final = out
        self.requests += 1
        return final

    async def _round(self, ids: list[int], cands: list[int]) -> Any:
        """One round as the vLLM runner sends it (top-K rows, prefix cache, resend on junk rows)."""
        tokens, first = ids + cands, len(ids)
        out = await self._request(tokens, _params(TOP_K, use_cache=True))
        cached = out.num_cached_tokens or 0
        if cached > first - 1:
            self.resends += 1
            out = await self._request(tokens, _params(TOP_K, use_cache=False))
            cached = 0
        self.cached += cached
        self.computed += len(tokens) - cached
        return out

    async def speculative(self) -> int:
        ids, committed = self._tokens(self.prompt_len), 0
        while committed < self.max_tokens:
            accepted = self.replay.draw(self.rng)
            cands = self._tokens(self.replay.k)
            out = await self._round(ids, cands)
            new = cands[:accepted] + [out.outputs[0].token_ids[0]]
            new = new[: self.max_tokens - committed]
            ids += new
            committed += len(new)
        return committed

    async def plain_rounds(self) -> int:
        ids = self._tokens(self.prompt_len)
        for _ in range(self.max_tokens):
            out = await self._round(ids, [])
            ids.append(out.outputs[0].token_ids[0])
        return self.max_tokens

    async def plain(self) -> int:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=self.max_tokens, min_tokens=self.max_tokens, temperature=0.0,
                                detokenize=False, ignore_eos=True)
        out = await self._request(self._tokens(self.prompt_len), params)
        self.computed += self.prompt_len - (out.num_cached_tokens or 0) + self.max_tokens
        return len(out.outputs[0].token_ids)


def _params(k: int, use_cache: bool) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, flat_logprobs=True,
                          prompt_logprobs=k, logprobs=k, skip_reading_prefix_cache=not use_cache)


MODES = ("plain", "plain-rounds", "speculative")


async def phase(llm: Any, mode: str, n: int, args: argparse.Namespace, vocab: int, replay: Replay) -> dict:
    """N streams of ``mode`` released together; the wall time until the last one finishes."""
    await llm.reset_prefix_cache()
    streams = [Streams(llm, vocab, args.prompt_tokens, args.max_tokens, replay, seed=1000 * n + i) for i in range(n)]
    run = {"plain": Streams.plain, "plain-rounds": Streams.plain_rounds, "speculative": Streams.speculative}[mode]
    t0 = time.perf_counter()
    committed = sum(await asyncio.gather(*(run(s) for s in streams)))
    wall = time.perf_counter() - t0
    requests = sum(s.requests for s in streams)
    return {
        "mode": mode, "n_streams": n, "committed_tokens": committed, "wall_s": round(wall, 4),
        "tokens_per_gpu_s": round(committed / wall, 2), "requests": requests,
        "tokens_per_request": round(committed / max(requests, 1), 3),
        "positions_per_token": round(sum(s.computed for s in streams) / committed, 3),
        "cached_tokens": sum(s.cached for s in streams), "cache_resends": sum(s.resends for s in streams),
    }  # fmt: skip


def engine_args(args: argparse.Namespace, model_dir: str) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=model_dir, load_format="dummy", skip_tokenizer_init=True, seed=0,
        dtype="float32" if args.smoke else "bfloat16",
        max_model_len=args.prompt_tokens + args.max_tokens + 64, max_num_seqs=max(args.n),
        enable_prefix_caching=True, max_logprobs=-1, block_size=BLOCK_SIZE,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.smoke or args.enforce_eager,
        kv_cache_memory_bytes=(256 << 20) if args.smoke else None, disable_log_stats=True,
    )  # fmt: skip


async def measure(args: argparse.Namespace) -> dict:
    from vllm.v1.engine.async_llm import AsyncLLM

    config = SMOKE_CONFIG if args.smoke else QWEN2_CONFIG
    replay = load_replay(args.acceptance, args.pair, args.draft_tokens)
    llm = AsyncLLM.from_engine_args(engine_args(args, write_model_dir(config)))
    try:
        for mode in MODES:  # warm-up: every request shape once
            await phase(llm, mode, 2, argparse.Namespace(**{**vars(args), "max_tokens": 4}), config["vocab_size"], replay)
        rows = []
        for n in args.n:
            by_mode = {mode: await phase(llm, mode, n, args, config["vocab_size"], replay) for mode in MODES}
            plain = by_mode["plain"]["tokens_per_gpu_s"]
            for r in by_mode.values():
                r["capacity_ratio_vs_plain"] = round(r["tokens_per_gpu_s"] / plain, 3)
                rows.append(r)
                print(f"N={n:3d} {r['mode']:13s} {r['tokens_per_gpu_s']:10.1f} tok/GPU-s  "
                      f"{r['tokens_per_request']:5.2f} tok/request  {r['positions_per_token']:6.2f} pos/tok  "
                      f"ratio {r['capacity_ratio_vs_plain']:5.2f}", flush=True)
    finally:
        llm.shutdown()
    import torch
    import vllm

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke)"
    return {
        "device": device, "vllm": vllm.__version__, "torch": torch.__version__,
        "model": ("tiny Qwen2 (smoke)" if args.smoke else "Qwen2.5-Coder-1.5B architecture") + ", random weights",
        "dtype": "float32" if args.smoke else "bfloat16", "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens, "top_k_rows": TOP_K,
        "replay": {"source": args.acceptance or "assumed (built in)", "draft_tokens": replay.k, "accepted_weights": replay.weights,
                   "mean_tokens_per_round": round(replay.mean_tokens_per_round(), 3)},
        "rows": rows,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu.vllm_capacity", description=__doc__.split("\n")[0])
    ap.add_argument("--n", nargs="+", type=int, help=f"concurrent streams (default {' '.join(map(str, NS))})")
    ap.add_argument("--prompt-tokens", type=int, help="random prompt tokens per stream (default 256)")
    ap.add_argument("--max-tokens", type=int, help="committed tokens per stream (default 128)")
    ap.add_argument("--acceptance", help="a sled-bench --json whose record's acceptance counts to replay")
    ap.add_argument("--pair", help="with --acceptance: the record's pair")
    ap.add_argument("--draft-tokens", type=int, help="k per round (default: the recording's)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny model on vLLM's CPU build, N 1 2, 32 prompt and 8 new tokens: checks the script")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.n = args.n or ([1, 2] if smoke else list(NS))
    args.prompt_tokens = args.prompt_tokens or (32 if smoke else 256)
    args.max_tokens = args.max_tokens or (8 if smoke else 128)
    if smoke:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{len(os.sched_getaffinity(0)) - 1}")
    result = asyncio.run(measure(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
