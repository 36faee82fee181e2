"""The replaying verifier that benchmarks use for a GPU's timing (``--replay``): recorded with the
real target, it commits exactly what the target commits, and ends a prompt it has no recording of."""
from __future__ import annotations

import json

import pytest

from edge_agent.agent import Agent
from edge_agent.client import VerifierClient
from shared.models import resolve
from verifier_server.llama.forward import ForwardItem
from verifier_server.llama.reference import plain_reference
from verifier_server.llama.replay import ReplayBackend, load_recordings
from verifier_server.process import VerifierProcess

from prompts import RAW

TARGET = "qwen2.5-coder-0.5b"


def test_rows_name_the_recorded_next_token_and_end_off_the_recording():
    backend = ReplayBackend(resolve(TARGET), TARGET, [[1, 2, 3, 4, 5]], n_slots=2)
    try:
        rows = backend.forward([ForwardItem(0, 0, [1, 2], 2), ForwardItem(1, 0, [1, 9], 1)])
        assert [int(rows[0][j].argmax()) for j in range(2)] == [2, 3]
        assert int(rows[1][0].argmax()) == backend.tokenizer.eos  # off the recording
        state = backend.save_state(0)
        rows = backend.forward([ForwardItem(0, 1, [7, 8], 1)])  # a rejected draft, rolled back below
        assert int(rows[0][0].argmax()) == backend.tokenizer.eos
        backend.load_state(1, state)
        assert int(backend.forward([ForwardItem(1, 2, [3], 1)])[0][0].argmax()) == 4
    finally:
        backend.close()


def test_a_bad_recordings_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "r.jsonl"
    for text in ('{"ids": [1, "x"]}', "[1, 2]", "{ids"):
        bad.write_text(text + "\n")
        with pytest.raises(ValueError, match=r"r\.jsonl:1"):
            load_recordings(bad)


@pytest.mark.slow
def test_a_replaying_verifier_commits_what_the_target_commits(tmp_path, drafter, reference_backend):
    backend = reference_backend(TARGET)
    prompt = RAW[0]
    prompt_ids = backend.tokenizer.prompt_ids(prompt, None)
    ref = plain_reference(backend, prompt_ids, 32)
    recordings = tmp_path / "recordings.jsonl"
    recordings.write_text(json.dumps({"ids": prompt_ids + ref.ids}) + "\n")
    with VerifierProcess(TARGET, "--replay", str(recordings), "--emulate-pass-ms", "5", "--slots", "2",
                         log=tmp_path / "verifier.log") as v, VerifierClient(v.url) as client:
        # A fixed draft length, so that every round carries a draft for the replay to accept or roll
        # back: an adaptive controller may rightly stop drafting when a 5 ms pass beats the board's
        # draft steps, and then the replay would be checked on plain rounds only.
        agent = Agent(client, drafter("smollm2-135m"), pipelined=True)
        result = agent.generate(prompt, max_tokens=32)
        assert result.ids == ref.ids and result.rounds < len(ref.ids)
        other = agent.generate(RAW[1], max_tokens=32)
        assert other.finish_reason == "eos" and other.text == b""
