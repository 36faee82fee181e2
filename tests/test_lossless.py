"""Speculation through the real HTTP server reproduces plain decoding of the target: greedy, and
seeded sampling at temperature 0.7 (SLEM: the same seed gives the same text, whatever the drafter).

Three drafter -> target pairs over 16 prompts, 64 new tokens each. Each output must equal the
target's own one-token-at-a-time output, or diverge first at a near-tie (a margin below
NEAR_TIE_GAP: the top-2 logit gap, or the gap of the best two perturbed scores when sampling); both counts and the gaps are reported in the terminal summary. And position by
position: the target, teacher-forced one token at a time over prompt + committed ids, must have
every committed token as its argmax within TEACHER_FORCED_MARGIN (the count of exact argmaxes and
the largest deficit are reported).
"""
from __future__ import annotations

import pytest

from edge_agent.agent import Agent
from edge_agent.client import VerifierClient
from shared.chat import chat_transcript
from shared.protocol import SamplingOptions
from shared.sampling import Sampling
from verifier_server.llama.reference import plain_reference, teacher_forced_deficits
from verifier_server.lossless import NEAR_TIE_GAP, TEACHER_FORCED_MARGIN, judge

from conftest import LOSSLESS_REPORT
from prompts import CHAT, RAW

PAIRS = [
    ("smollm2-135m", "qwen2.5-coder-0.5b"),
    ("gemma-3-270m", "qwen2.5-coder-0.5b"),  # SentencePiece drafter
    ("smollm2-135m", "gemma-3-270m"),  # SentencePiece target
]
MAX_TOKENS = 48
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled-t0.7"])
@pytest.mark.parametrize("drafter_name,target", PAIRS, ids=[f"{d}->{t}" for d, t in PAIRS])
def test_lossless_pair(drafter_name, target, temperature, verifier, drafter, reference_backend):
    """Greedy: the target's greedy output. Sampled (SLEM): with seed S, plain seeded sampling of the
    target with seed S, whatever the drafter proposed."""
    server = verifier(target, "--slots", "2", "--ctx-per-slot", "1024")
    backend = reference_backend(target)
    has_template = backend.tokenizer.chat_template is not None
    cases = [(p, None) for p in RAW]
    cases += [(None, m) if has_template else (chat_transcript(m), None) for m in CHAT]
    assert len(cases) >= 16

    counts = {"identical": 0, "near_tie": 0, "diverged": 0}
    failures, rounds, committed, tie_gaps, deficits = [], 0, 0, [], []
    with VerifierClient(server.url) as client:
        # A fixed draft length: the hint would shorten drafts on a CPU and test less speculation.
        agent = Agent(client, drafter(drafter_name), draft_tokens=6, follow_hint=False)
        for seed, (prompt, messages) in enumerate(cases, start=1000):
            options = SamplingOptions(temperature=temperature, seed=seed)
            result = agent.generate(prompt, messages, max_tokens=MAX_TOKENS, sampling=options)
            prompt_ids = backend.tokenizer.prompt_ids(prompt, messages)
            ref = plain_reference(backend, prompt_ids, MAX_TOKENS, Sampling.of(options), seed)
            verdict = judge(result.ids, ref)
            # An identical output is the reference's own one-by-one choice at every position, so
            # its teacher-forced deficits are 0 by construction: only a divergent one is fed again.
            forced = ([0.0] * len(result.ids) if verdict.kind == "identical" else
                      teacher_forced_deficits(backend, prompt_ids, result.ids, Sampling.of(options), seed))
            deficits += forced
            counts[verdict.kind] += 1
            if verdict.kind == "near_tie":
                tie_gaps.append(verdict.gap)
            rounds += result.rounds
            committed += result.committed_tokens
            label = (prompt or messages[-1].content)[:30]
            if verdict.kind == "diverged":
                failures.append(f"{label!r}: diverged at token {verdict.position} (gap {verdict.gap:.3f})")
            off = [(i, round(d, 3)) for i, d in enumerate(forced) if d >= TEACHER_FORCED_MARGIN]
            if off:
                failures.append(f"{label!r}: committed tokens far from the teacher-forced argmax: {off}")
            if "\ufffd" in result.text.decode(errors="replace") and "\ufffd" not in ref.text.decode(errors="replace"):
                failures.append(f"{label!r}: U+FFFD in output but not in the reference")
            if verdict.kind == "identical":
                assert result.text == ref.text[: len(result.text)], label
    not_argmax = [d for d in deficits if d > 0]
    LOSSLESS_REPORT.append(
        f"{drafter_name}->{target} at T={temperature}: {counts['identical']} identical, {counts['near_tie']} near-tie "
        f"(first-divergence gaps {sorted(round(g, 3) for g in tie_gaps)}, each < {NEAR_TIE_GAP}), "
        f"{counts['diverged']} diverged "
        f"of {len(cases)}; teacher-forced: {len(deficits) - len(not_argmax)}/{len(deficits)} committed "
        f"tokens are the one-by-one choice, the rest trail it by at most "
        f"{max(not_argmax, default=0):.3f} (limit {TEACHER_FORCED_MARGIN}); {committed / max(rounds, 1):.2f} tokens/round"
    )
    assert not failures, failures
