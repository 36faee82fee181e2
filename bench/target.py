"""What the benchmark measures on a target in its own process, before any verifier runs.

The target is loaded once per benchmark run, with the verifier's cores and thread count so that
its cost curve describes the verifier's forward passes: it yields the greedy references of the
lossless check, the measured cost curve t(B) and the parameter count for the GPU model. It is closed
before the verifier starts so the two never compete for cores or memory.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.lossless import references
from bench.procs import BenchError, Engine, spawn_env
from bench.workload import Prompt, prompt_seed
from shared.models import resolve
from shared.sampling import GREEDY_SAMPLING, Sampling
from verifier_server.llama.calibration import measure_cost_curve
from verifier_server.lossless import Reference

COST_CURVE_TOKENS = (1, 2, 4, 8, 16, 32, 64)
COST_CURVE_REPEATS = 3


@dataclass
class TargetProfile:
    name: str
    n_params: int
    cost_curve: list[dict]  # [{"tokens": B, "seconds": best of COST_CURVE_REPEATS}]
    references: dict[str, Reference]
    # per prompt: its ids then the reference's, for a verifier that replays them (``--replay``)
    recordings: list[list[int]]
    prompt_ids: dict[str, list[int]]  # per prompt id: the target's tokens of the (rendered) prompt


def profile(target: str, prompts: list[Prompt], max_tokens: int, cores: tuple[int, ...],
            sampling: Sampling = GREEDY_SAMPLING) -> TargetProfile:
    """Load ``target`` on ``cores`` (this process is pinned there meanwhile) and measure it."""
    from verifier_server.llama.backend import LlamaBackend  # the one import of llama.cpp here

    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        backend = LlamaBackend(resolve(target), target, n_slots=1, ctx_per_slot=4096, n_threads=len(cores))
        try:
            refs = references(backend, prompts, max_tokens, sampling)
            prompt_ids = {p.id: backend.tokenizer.prompt_ids(p.prompt, p.message_list) for p in prompts}
            return TargetProfile(
                name=target,
                n_params=backend.n_params,
                cost_curve=[
                    {"tokens": b, "seconds": round(t, 6)}
                    for b, t in measure_cost_curve(backend, COST_CURVE_TOKENS, COST_CURVE_REPEATS).items()
                ],
                references=refs,
                recordings=[prompt_ids[p.id] + refs[p.id].ids for p in prompts],
                prompt_ids=prompt_ids,
            )
        finally:
            backend.close()
    finally:
        os.sched_setaffinity(0, saved)


def vllm_references(prof: TargetProfile, prompts: list[Prompt], max_tokens: int, cores: tuple[int, ...],
                    engine: Engine, sampling: Sampling = GREEDY_SAMPLING) -> dict[str, Reference]:
    """Plain decoding of ``prof``'s target on vLLM (``verifier_server.vllm.reference``, one token
    per request, in the vLLM environment, on ``cores``): the lossless check's references for the
    vLLM verifier, whose float weights round differently from llama.cpp's."""
    with tempfile.TemporaryDirectory(prefix="sled-bench-vllm-ref-") as tmp:
        jobs, log = Path(tmp) / "jobs.jsonl", Path(tmp) / "reference.log"
        jobs.write_text("".join(json.dumps({
            "prompt_ids": prof.prompt_ids[p.id], "max_tokens": max_tokens, "temperature": sampling.temperature,
            "top_k": sampling.top_k, "top_p": sampling.top_p, "min_p": sampling.min_p, "seed": prompt_seed(p.id),
        }) + "\n" for p in prompts))
        cmd = [engine.python, "-m", "verifier_server.vllm.reference", "--jobs", str(jobs), "--",
               "--model", prof.name, "--threads", str(len(cores)), *engine.options]
        proc = spawn_env(cmd, log, cores, stdout=subprocess.PIPE)
        out, _ = proc.communicate()
        # vLLM's processes write to stdout too: the answers are the lines marked RESULT
        answers = [json.loads(line.removeprefix("RESULT "))
                   for line in out.decode(errors="replace").splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or len(answers) != len(prompts):
            raise BenchError(f"the vLLM reference failed (exit {proc.returncode}):\n"
                             f"{log.read_text(errors='replace')[-2000:]}")
    return {p.id: Reference(ids=a["ids"], gaps=a["gaps"], finish_reason=a["finish_reason"])
            for p, a in zip(prompts, answers)}
