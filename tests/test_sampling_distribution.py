"""End to end at temperature 1: the first two generated tokens over 500 seeds follow the target's
own distribution, SmolLM2 drafting for Qwen with SLEM-sampling and with TLI (whose drafts, from
another vocabulary, are often rejected: the residual draws are exercised). The expected
distribution is exact: p(t1) from the target's logits after the prompt, p(t2 | t1) after each
observed t1."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.client import VerifierClient
from shared.protocol import SamplingOptions
from verifier_server.llama.forward import ForwardItem

from conftest import LOSSLESS_REPORT
from stats import chi_square

TARGET = "qwen2.5-coder-0.5b"
PROMPT = "The best way to learn"
SEEDS = 500  # end to end, the short version: test_sampling checks the rejection step itself over 200,000 trials
pytestmark = pytest.mark.slow


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def _next_distribution(backend, ids: list[int]) -> np.ndarray:
    backend.forward([ForwardItem(0, 0, ids[:-1], 0)])
    return _softmax(np.array(backend.forward([ForwardItem(0, len(ids) - 1, ids[-1:], 1)])[0][0]))


@pytest.mark.parametrize("drafter_name,mode", [("smollm2-135m", "slem"), ("smollm2-135m", "tli")], ids=["slem", "tli"])
def test_first_two_tokens_follow_the_target_distribution(drafter_name, mode, verifier, drafter, reference_backend):
    server = verifier(TARGET, "--slots", "2", "--ctx-per-slot", "1024")
    backend = reference_backend(TARGET)
    prompt = backend.tokenizer.prompt_ids(PROMPT, None)
    pairs: Counter = Counter()
    with VerifierClient(server.url) as client:
        agent = Agent(client, drafter(drafter_name), draft_tokens=2, follow_hint=False, sampling_mode=mode)
        for seed in range(SEEDS):
            result = agent.generate(PROMPT, max_tokens=2, sampling=SamplingOptions(temperature=1.0, seed=seed))
            pairs[tuple(result.ids[:2])] += 1
    first = _next_distribution(backend, prompt)
    expected = {}
    for t1 in {t1 for t1, _ in pairs}:
        second = _next_distribution(backend, prompt + [t1])
        for t2 in np.flatnonzero(second * first[t1] * SEEDS >= 0.01):
            expected[(t1, int(t2))] = float(first[t1] * second[t2])
    firsts: Counter = Counter()
    for (t1, _), count in pairs.items():
        firsts[t1] += count
    stat1, k1, p1 = chi_square(firsts, {int(t): float(first[t]) for t in range(first.size)}, SEEDS)
    stat2, k2, p2 = chi_square(pairs, expected, SEEDS)
    tv = 0.5 * sum(abs(firsts.get(t, 0) / SEEDS - first[t]) for t in set(firsts) | set(np.flatnonzero(first > 1e-3).tolist()))
    LOSSLESS_REPORT.append(
        f"{mode} ({drafter_name} -> {TARGET}, T=1, {SEEDS} seeds): first token chi-square {stat1:.1f} / {k1} dof, "
        f"p = {p1:.3f}, TV {tv:.3f}; first two tokens chi-square {stat2:.1f} / {k2} dof, p = {p2:.3f}"
    )
    assert p1 > 0.001 and p2 > 0.001, (stat1, p1, stat2, p2)
