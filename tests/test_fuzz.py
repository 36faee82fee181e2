"""Bad input, generated: schemathesis sends requests built from the verifier's OpenAPI document
(every route, JSON and msgpack bodies, valid and invalid) to a real verifier process, each one with
a device token and again without; no answer may be a 5xx, and afterwards the server still serves a
real generation. Hypothesis drives the msgpack/JSON codec the same way, without a server."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from edge_agent.agent import Agent
from edge_agent.client import VerifierClient
from shared.codec import DecodeError, decode, encode
from shared.protocol import Proposal, SessionCreate, VerifyRequest
from verifier_server.auth import hash_token, new_token
from verifier_server.process import VerifierProcess

from conftest import LOSSLESS_REPORT

TARGET = "smollm2-135m"
MIN_REQUESTS = 10_000
# Operations with inputs to vary (creation, a round, deletion) share the requests; the others
# (no parameters) are exhausted by a handful of examples.
EXAMPLES_PER_OPERATION = 1_750
SENT: Counter[str] = Counter()
TOKEN = new_token()
OTHER = new_token()  # another device, for the generation afterwards (the fuzzer may hold its session limit)


@schemathesis.serializer("application/msgpack")
def _msgpack(ctx: Any, value: Any) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except OverflowError:  # an integer msgpack cannot carry: send a byte that msgpack never uses
        return b"\xc1"


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> Iterator[VerifierProcess]:
    work = tmp_path_factory.mktemp("fuzz")
    (work / "tokens").write_text(f"fuzzer {hash_token(TOKEN)}\ndevice {hash_token(OTHER)}\n")
    # No round-rate limit: the fuzzer is one device sending as fast as it can.
    with VerifierProcess(TARGET, "--slots", "2", "--ctx-per-slot", "1024", "--device-rounds-per-s", "0",
                         "--no-access-log", auth=("--tokens", str(work / "tokens")), log=work / "verifier.log",
                         startup_timeout_s=120) as server:
        yield server


@pytest.mark.slow
def test_no_generated_request_gets_a_5xx(fuzzed):
    api = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10  # every route, the operators' ones included

    for operation in operations:
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        @given(case=operation.as_strategy())
        def fuzz(case) -> None:
            for headers in ({"authorization": f"Bearer {TOKEN}"}, {}):
                response = case.call(base_url=fuzzed.url, headers=headers, timeout=60)
                SENT[f"{case.method} {case.path}"] += 1
                case.validate_response(response, checks=[not_a_server_error])

        fuzz()


@pytest.mark.slow
def test_after_fuzzing_the_server_serves_a_real_generation(fuzzed):
    """Runs after the fuzzing (pytest keeps the file's order): the count, then a generation."""
    if not SENT:
        pytest.skip("the fuzzing test did not run")
    total = sum(SENT.values())
    LOSSLESS_REPORT.append(f"fuzzing: {total} generated requests over {len(SENT)} routes, 0 answers 5xx: "
                           + ", ".join(f"{route} {n}" for route, n in sorted(SENT.items())))
    assert total >= MIN_REQUESTS, SENT
    with VerifierClient(fuzzed.url, token=OTHER) as client:
        result = Agent(client, None).generate("def add(a, b):", max_tokens=8)
    assert result.committed_tokens == 8 and result.text


# --- the codec, without a server ------------------------------------------------------------------
MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=256) | MSGPACK_VALUES.map(lambda v: msgpack.packb(v, use_bin_type=True)),
       st.sampled_from(["application/msgpack", "application/json"]), st.sampled_from([SessionCreate, VerifyRequest]))
def test_the_codec_rejects_any_bad_body_with_a_decode_error(body, content_type, model):
    try:
        decode(body, content_type, model)
    except DecodeError as e:
        assert str(e)  # says what is wrong


@st.composite
def verify_requests(draw) -> VerifyRequest:
    if not draw(st.booleans()):
        return VerifyRequest(round=draw(st.integers(1, 2**40)), draft=draw(st.binary(max_size=64)))
    ids = draw(st.lists(st.integers(0, 200_000), min_size=1, max_size=6))
    proposals = []
    for token in ids:
        others = draw(st.lists(st.integers(0, 200_000).filter(lambda t, token=token: t != token), max_size=3, unique=True))
        weights = [draw(st.floats(0.01, 1.0)) for _ in range(len(others) + 1)]
        total = math.fsum(weights)
        proposals.append(Proposal(ids=[token, *others], probs=[w / total for w in weights]))
    return VerifyRequest(round=draw(st.integers(1, 2**40)), draft=draw(st.binary(max_size=64)), draft_ids=ids,
                         proposals=proposals)


@settings(max_examples=300, deadline=None)
@given(verify_requests(), st.booleans())
def test_the_codec_round_trips_every_valid_round(request, packed):
    content_type = "application/msgpack" if packed else "application/json"
    assert decode(encode(request, packed), content_type, VerifyRequest) == request
