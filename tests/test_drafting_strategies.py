"""The device's drafting strategies on real models, through a real verifier: the draft controller,
pipelined drafting, the n-gram drafter and the hierarchical one. Each output follows the lossless
rule against the target's plain greedy output (only the verifier commits); the test also checks
that each strategy did what it is for, and reports its figures."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.strategies import EDIT_WORKLOAD
from bench.workload import load
from edge_agent.agent import Agent
from edge_agent.client import VerifierClient
from edge_agent.drafting import HierarchicalSource, ModelSource, NgramSource
from verifier_server.llama.reference import plain_reference
from verifier_server.lossless import judge

from conftest import LOSSLESS_REPORT, ROOT
from prompts import RAW

TARGET = "qwen2.5-coder-0.5b"
MAX_TOKENS = 40
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(verifier):
    # Passes padded to 150 ms, as a GPU verifier on a slow link would take: drafting pays there
    # whatever this machine's speed, so each strategy has something to show.
    return verifier(TARGET, "--slots", "2", "--ctx-per-slot", "1024", "--emulate-pass-ms", "150")


def _check(backend, name: str, prompt: str | None, messages, result) -> str:
    ref = plain_reference(backend, backend.tokenizer.prompt_ids(prompt, messages), MAX_TOKENS)
    verdict = judge(result.ids, ref)
    assert verdict.kind != "diverged", (name, verdict)
    assert result.text == b"".join(backend.tokenizer.piece(t) for t in result.ids)
    return verdict.kind


def test_text_committed_by_rounds_without_a_draft_is_spelt_when_the_drafter_drafts(drafter):
    """A round without a draft defers the drafter's tokenizing; the deferred spans are all there,
    in drafter ids after the ones it held, when it next drafts (spelt in one go, so possibly not
    the ids that span-by-span spelling gives: the same text)."""
    d = drafter("smollm2-135m")
    spans = [b"def fib", b"(n):\n", b"    if n", b" < 2:", b"\n        return n"]
    views = []
    for append in (d.commit, d.defer):
        d.start(RAW[0], None)
        prompt = list(d.tokens)
        for span in spans:
            append(span)
        views.append(d.tokens)
        assert views[-1][: len(prompt)] == prompt
        assert b"".join(d.tokenizer.piece(t) for t in views[-1][len(prompt):]) == b"".join(spans)
        assert d.draft(4)  # drafts on from there
    assert len(views[1]) <= len(views[0])  # one go merges across the spans' edges


def test_adaptive_and_pipelined_drafting_stay_lossless(server, drafter, reference_backend):
    backend = reference_backend(TARGET)
    with VerifierClient(server.url) as client:
        agent = Agent(client, drafter("smollm2-135m"), draft_tokens=8, follow_hint=False, adaptive=True,
                      pipelined=True)
        kinds, drafted, used, rounds, chained, stale = [], 0, 0, 0, 0, 0
        for prompt in RAW[:3]:
            result = agent.generate(prompt, max_tokens=MAX_TOKENS)
            kinds.append(_check(backend, "adaptive+pipelined", prompt, None, result))
            drafted, used, rounds = drafted + result.ahead_drafted, used + result.ahead_used, rounds + result.rounds
            chained, stale = chained + result.chained_rounds, stale + result.stale_rounds
            assert result.decisions and all(0 <= d["k"] <= 8 for d in result.decisions)
    assert drafted > 0  # it drafted while rounds were in flight
    assert chained > 0  # and sent look-aheads as chained rounds that the verifier took
    LOSSLESS_REPORT.append(f"adaptive+pipelined (smollm2 -> {TARGET}): {kinds}; look-ahead drafted {drafted}, "
                           f"used {used} tokens over {rounds} rounds, {chained} of them chained ({stale} stale)")


def test_the_ngram_drafter_needs_no_model_and_repeats_what_it_has_seen(server, reference_backend):
    backend = reference_backend(TARGET)
    edit = load(EDIT_WORKLOAD)[0]
    with VerifierClient(server.url) as client:
        agent = Agent(client, NgramSource(), draft_tokens=64, follow_hint=False)
        result = agent.generate(None, edit.message_list, max_tokens=MAX_TOKENS)
    kind = _check(backend, "ngram", None, edit.message_list, result)
    per_round = result.committed_tokens / result.rounds
    LOSSLESS_REPORT.append(f"ngram on an edit (no model, {TARGET}): {kind}, {per_round:.2f} tokens per round")
    assert per_round >= 2.0  # the answer repeats the file from the prompt


def test_the_hierarchical_drafter_measures_its_choice(server, drafter, reference_backend):
    backend = reference_backend(TARGET)
    edit = load(EDIT_WORKLOAD)[2]  # a JSON file to repeat with one change
    source = HierarchicalSource(ModelSource(drafter("smollm2-135m")))
    with VerifierClient(server.url) as client:
        agent = Agent(client, source, draft_tokens=10, follow_hint=False)
        kinds = [_check(backend, "ngram+gguf", p, m, agent.generate(p, m, max_tokens=MAX_TOKENS))
                 for p, m in ((None, edit.message_list), (RAW[4], None))]
    LOSSLESS_REPORT.append(f"ngram+smollm2 ({TARGET}): {kinds}; rounds opened by {source.chosen}; "
                           f"acceptance ngram {source.rates['ngram'].value:.2f}, gguf {source.rates['gguf'].value:.2f}")
    assert source.chosen["ngram"] > 0 and source.chosen["gguf"] > 0


def test_the_agent_cli_logs_the_controllers_decisions(server):
    out = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "generate", "--server", server.url, "--drafter", "smollm2-135m",
         "--threads", "1", "--adaptive", "--pipelined", "--fixed-draft", "--max-tokens", "12", "--json", RAW[0]],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    summary = json.loads(out)
    assert summary["controller"] and {"k", "hint", "expected_tokens", "threshold"} <= set(summary["controller"][0])
    assert summary["committed_tokens"] == 12 and "lookahead" in summary
