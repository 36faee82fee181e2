"""Plain decoding on vLLM: the baseline the vLLM runner's speculation must reproduce.

One request per token, each the whole row after the ids so far (vLLM reads the prefix from its
cache and computes the one new position), and the verifier's own draw on it (greedy, or seeded
sampling exactly as ``shared.sampling`` draws), with the margin of every step; and the
teacher-forced check of committed ids, one position at a time. ``python -m
verifier_server.vllm.reference`` answers jobs (JSON lines, from a file or standard input, one at
a time) with one engine start: the tests' oracle, run in the vLLM environment. Each answer is a
line ``RESULT {json}`` (vLLM's worker processes may write their own lines to standard output).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.sampling import GREEDY_SAMPLING, Sampling, draw, scores
from verifier_server.acceptance import TopRow
from verifier_server.lossless import Reference
from verifier_server.vllm.runner import VllmRunner


def _greedy_row(row: TopRow) -> np.ndarray:
    """A greedy step's row from a top-K row: the listed log-probabilities, and for every other id
    the K-th's (an upper bound: its deficit is at least what this gives). The argmax and the top-2
    margin are exact; a whole-vocabulary row per step is needed only when sampling."""
    x = np.full(row.n_vocab, row.logprobs[-1])
    x[row.ids] = row.logprobs
    return x


def _next_row(runner: VllmRunner, ids: list[int], sampling: Sampling) -> np.ndarray:
    """The row after ``ids``, as ``shared.sampling`` draws from it."""
    if sampling.greedy:
        return _greedy_row(runner.call(runner.next_row(ids, full=False)))
    return runner.call(runner.next_row(ids, full=True))


def plain_reference(runner: VllmRunner, prompt: list[int], max_tokens: int,
                    sampling: Sampling = GREEDY_SAMPLING, seed: int = 0) -> Reference:
    ref = Reference()
    ids = list(prompt)
    for position in range(len(prompt), len(prompt) + max_tokens):
        token, margin = draw(_next_row(runner, ids, sampling), sampling, seed, position)
        ref.ids.append(token)
        ref.gaps.append(margin)
        if runner.tokenizer.is_eog(token):
            ref.finish_reason = "eos"
            break
        ref.text += runner.tokenizer.piece(token)
        ids.append(token)
    return ref


def teacher_forced_deficits(runner: VllmRunner, prompt: list[int], ids: Sequence[int],
                            sampling: Sampling = GREEDY_SAMPLING, seed: int = 0) -> list[float]:
    """Per committed id, how far its score trails the one-by-one choice at its position."""
    deficits = []
    for i, token in enumerate(ids):
        x = scores(_next_row(runner, list(prompt) + list(ids[:i]), sampling), sampling, seed, len(prompt) + i)
        deficits.append(float(x.max() - x[token]))
    return deficits


def answer(runner: VllmRunner, job: dict[str, Any]) -> dict[str, Any]:
    """A job: ``prompt_ids``, ``max_tokens`` (plain decoding) or ``forced_ids`` (teacher-forced),
    and optionally ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``."""
    sampling = Sampling(job.get("temperature", 0.0), job.get("top_k", 0), job.get("top_p", 1.0), job.get("min_p", 0.0))
    seed = job.get("seed", 0)
    if "forced_ids" in job:
        return {"deficits": teacher_forced_deficits(runner, job["prompt_ids"], job["forced_ids"], sampling, seed)}
    ref = plain_reference(runner, job["prompt_ids"], job["max_tokens"], sampling, seed)
    return {"ids": ref.ids, "gaps": ref.gaps, "finish_reason": ref.finish_reason}


def main(argv: list[str] | None = None) -> None:
    from verifier_server import cli

    ap = argparse.ArgumentParser(prog="python -m verifier_server.vllm.reference", description=__doc__)
    ap.add_argument("--jobs", type=argparse.FileType(), default="-", help="JSON lines, one job each (default: stdin)")
    ap.add_argument("serve_options", nargs=argparse.REMAINDER,
                    help="after --: sled-verifier serve options that pick the model and the engine's settings")
    args = ap.parse_args(argv)
    options = cli.serve_args([*args.serve_options[args.serve_options[:1] == ["--"]:], "--engine", "vllm"])
    runner = cli.vllm_runner(options)
    try:
        print("READY", flush=True)
        for line in iter(args.jobs.readline, ""):
            if line.strip():
                print("RESULT", json.dumps(answer(runner, json.loads(line))), flush=True)
    finally:
        runner.close()


if __name__ == "__main__":
    main()
