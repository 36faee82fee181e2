"""The verifier client's guard on device tokens: a token sent in clear text across a network is
warned about, once, when the first client for that URL is made."""
from __future__ import annotations

import logging

import pytest

from edge_agent.client import VerifierClient, is_loopback


@pytest.mark.parametrize("url,loopback", [
    ("http://127.0.0.1:8000", True),
    ("http://127.8.9.10", True),
    ("http://localhost:8000", True),
    ("http://[::1]:8000", True),
    ("http://10.0.0.7:8000", False),
    ("http://verifier.lan:8000", False),
    ("http://0.0.0.0:8000", False),
])
def test_loopback_urls(url, loopback):
    assert is_loopback(url) is loopback


def test_a_token_in_clear_text_over_a_network_is_warned_about_once(caplog):
    caplog.set_level(logging.WARNING, logger="sled.agent")
    exposed = "http://10.20.30.40:8000"
    VerifierClient([exposed, "http://127.0.0.1:8000", "https://10.20.30.41"], token="secret").close()
    warnings = [r for r in caplog.records if r.name == "sled.agent"]
    assert len(warnings) == 1
    assert exposed in warnings[0].getMessage() and "clear text" in warnings[0].getMessage()
    assert "127.0.0.1" not in warnings[0].getMessage() and "10.20.30.41" not in warnings[0].getMessage()
    # The daemon makes a client per request: the warning came once, at its start.
    VerifierClient(exposed, token="secret").close()
    assert len([r for r in caplog.records if r.name == "sled.agent"]) == 1


def test_no_warning_without_a_token_or_over_tls_or_on_this_machine(caplog):
    caplog.set_level(logging.WARNING, logger="sled.agent")
    VerifierClient("http://10.20.30.50:8000").close()  # no token to leak
    VerifierClient("https://10.20.30.51:8000", token="secret").close()
    VerifierClient(["http://127.0.0.1:8000", "http://localhost:8001"], token="secret").close()
    assert not [r for r in caplog.records if r.name == "sled.agent"]
