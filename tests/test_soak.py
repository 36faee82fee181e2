"""The soak benchmark's short version: simulated devices with their own tokens replay drafts
recorded from a real agent run against one verifier, with more devices than KV slots, so sessions
come and go, get evicted and parked. No round may fail. (The 10-minute, 200-device run is
``sled-bench soak``; its memory and latency figures are reported in the README, not enforced here.)"""
from __future__ import annotations

import pytest

from bench.soak import soak

from conftest import LOSSLESS_REPORT

pytestmark = pytest.mark.slow


def test_a_short_soak_has_no_errors():
    report = soak(devices=24, duration_s=20, target="qwen2.5-coder-0.5b", drafter="smollm2-135m", think_ms=30,
                  prompts=2, max_tokens=24, slots=4, parked_mb=16)
    LOSSLESS_REPORT.append(f"soak (short): {report.summary()}")
    assert report.errors == {}
    assert report.sessions > 24 and report.rounds > 0  # devices finished sessions and started new ones
    assert report.committed_tokens > report.rounds  # the recorded drafts were accepted, in part
    assert report.evictions > 0  # more sessions than slots: the parking path ran
