"""The daemon's answers against OpenAI's published OpenAPI document (openai/openai-openapi), with
`jsonschema`: the models list, chat and text completions, every streamed chunk (the usage chunk
included) and the error bodies.

How the document is read:

- It still writes OpenAPI 3.0's ``nullable: true``, which JSON Schema spells as a null type: each
  such schema becomes ``anyOf: [the schema, {type: null}]``.
- Its objects are open (no ``additionalProperties: false``), so the daemon's extra ``sled`` field
  (the speculation figures) conforms as published, and OpenAI's clients keep it (``model_extra``).
  Open objects would also pass a misspelt field, though, so every answer is checked a second time
  against a closed copy, where an object may hold only the properties the document lists, and
  ``sled`` at the top of a completion is the one addition allowed.
- Streamed text completions share ``CreateCompletionResponse`` with whole ones, whose
  ``finish_reason`` the document never allows to be null. OpenAI's own streams send null until the
  last chunk (and a finish reason before the end would be a lie), so for stream chunks only the
  finish reason may also be null.
"""
from __future__ import annotations

import copy
import functools
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from edge_agent.drafting import NgramSource
from verifier_server.process import VerifierProcess

from test_daemon import DEAD, LIMITS, MESSAGES, TARGET, config_for, serving

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT.parent / "shared" / "openai" / "openapi.json.gz"
if not DOCUMENT.is_file():
    pytest.skip(f"OpenAI's OpenAPI document is not at {DOCUMENT} (the shared/ folder beside the repository)",
                allow_module_level=True)

ANSWERS = ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse")
TEXT_CHUNK = "CreateCompletionResponse (stream chunk)"  # see the module's docstring


def _json_schema(schema: Any, closed: bool) -> Any:
    """An OpenAPI schema as JSON Schema: ``nullable`` as a null type; ``closed``, objects without
    ``additionalProperties`` take no other properties."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    nullable = out.pop("nullable", False) is True
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: _json_schema(s, closed) for name, s in out["properties"].items()}
        if closed:
            out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if key in out:
            out[key] = _json_schema(out[key], closed)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in out:
            out[key] = [_json_schema(s, closed) for s in out[key]]
    return {"anyOf": [out, {"type": "null"}]} if nullable else out


@functools.cache
def _document() -> dict[str, Any]:
    with gzip.open(DOCUMENT) as f:
        return json.load(f)


@functools.cache
def _validator(name: str, closed: bool) -> Draft202012Validator:
    schemas = {n: _json_schema(s, closed) for n, s in _document()["components"]["schemas"].items()}
    if closed:
        for answer in ANSWERS:
            schemas[answer]["properties"]["sled"] = {"type": "object"}
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    finish = chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]
    chunk["properties"]["choices"]["items"]["properties"]["finish_reason"] = {"anyOf": [finish, {"type": "null"}]}
    schemas[TEXT_CHUNK] = chunk
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}})


def conforms(body: Any, name: str) -> None:
    """``body`` is a valid ``name`` of the document, open and closed."""
    for closed in (False, True):
        error = best_match(_validator(name, closed).iter_errors(body))
        assert error is None, (f"{name}{' (closed)' if closed else ''}: {error.message} at "
                               f"{'/'.join(map(str, error.absolute_path))}\n{json.dumps(body)[:2000]}")


def _chunks(client: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    """A stream's events, parsed, up to and including ``[DONE]``; fails when it ends without it."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]", events
    return [json.loads(e) for e in events[:-1]]


def test_a_closed_schema_refuses_what_the_open_one_lets_through():
    """The closed copy is what catches a misspelt field: the check can fail."""
    misspelt = {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x",
                                            "ownd_by": "x"}]}
    assert best_match(_validator("ListModelsResponse", False).iter_errors(misspelt)) is None
    with pytest.raises(AssertionError, match="closed"):
        conforms(misspelt, "ListModelsResponse")


@pytest.fixture(scope="module")
def offline() -> Iterator[httpx.Client]:
    """A daemon without a drafter whose verifier never answers: its lists and its errors."""
    with serving(config_for(DEAD, verifier_limits=LIMITS), [None]) as url, httpx.Client(base_url=url) as client:
        yield client


def test_the_models_list_conforms(offline):
    r = offline.get("/v1/models")
    assert r.status_code == 200
    conforms(r.json(), "ListModelsResponse")


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "n": 2}, 400),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "stop": [""]}, 400),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": LIMITS.max_context_tokens + 1}, 400),
    ("POST", "/v1/completions", {"prompt": 3}, 400),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4}, 503),
    ("GET", "/v1/nowhere", None, 404),
    ("GET", "/v1/chat/completions", None, 405),
])
def test_error_bodies_conform(offline, method, path, body, status):
    r = offline.request(method, path, json=body)
    assert r.status_code == status, r.text
    conforms(r.json(), "ErrorResponse")


def test_the_401_of_a_daemon_with_an_api_key_conforms():
    with serving(config_for(DEAD, api_key="s3cret-key"), [None]) as url:
        r = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    conforms(r.json(), "ErrorResponse")


@pytest.mark.parametrize(("path", "request_body", "chunk"), [
    ("/v1/chat/completions", {"messages": MESSAGES}, "CreateChatCompletionStreamResponse"),
    ("/v1/completions", {"prompt": "hi"}, TEXT_CHUNK),
])
def test_a_stream_that_fails_conforms_up_to_its_error(offline, path, request_body, chunk):
    """The verifier never answers: the first chunk, then an error chunk, then ``[DONE]``."""
    *chunks, error = _chunks(offline, path, {**request_body, "max_tokens": 4})
    assert chunks and "error" in error
    for c in chunks:
        conforms(c, chunk)
    conforms(error, "ErrorResponse")


@pytest.fixture(scope="module")
def online(verifier) -> Iterator[httpx.Client]:
    """A daemon drafting with n-grams in front of a real verifier."""
    target: VerifierProcess = verifier(TARGET, "--slots", "4", "--ctx-per-slot", "1024")
    with serving(config_for(target.url), [NgramSource()]) as url, httpx.Client(base_url=url, timeout=300) as client:
        yield client


@pytest.mark.slow
@pytest.mark.parametrize(("path", "request_body", "answer", "chunk"), [
    ("/v1/chat/completions", {"messages": MESSAGES}, "CreateChatCompletionResponse",
     "CreateChatCompletionStreamResponse"),
    ("/v1/completions", {"prompt": "def fibonacci(n):\n"}, "CreateCompletionResponse", TEXT_CHUNK),
])
def test_completions_and_every_streamed_chunk_conform(online, path, request_body, answer, chunk):
    body = {"model": TARGET, **request_body, "max_tokens": 12}
    whole = online.post(path, json=body)
    assert whole.status_code == 200
    conforms(whole.json(), answer)
    assert "sled" in whole.json()
    chunks = _chunks(online, path, {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12  # the usage chunk
    assert len(chunks) >= 3  # the first chunk, the text, the last (with its finish reason), the usage chunk
    for c in chunks:
        conforms(c, chunk)
