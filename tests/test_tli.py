"""Token-level intersection on the device: drafter pieces with the same bytes make one target
proposal, and the verifier's vocabulary hash is checked before it names a cache file."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from edge_agent.client import VerifierClient, VerifierError
from edge_agent.tli import TliProposer, intersection, target_vocabulary
from shared.protocol import VerifyRequest
from shared.sampling import Sampling


class Pieces:
    """A drafter tokenizer given by its pieces (only ``piece`` is used to build the map)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def piece(self, token: int) -> bytes:
        return self.pieces[token]


# Drafter ids 0 and 1 are both "\n" (a text token and the byte-fallback <0x0A>); 3 is a control token.
DRAFTER = Pieces([b"\n", b"\n", b"a", b""])
TARGET = [b"a", b"\n", b"b"]
LOGITS = np.array([1.0, 0.8, 1.2, 0.0], dtype=np.float32)


def test_drafter_pieces_with_the_same_bytes_are_one_target_id_in_a_proposal():
    mapping = intersection(DRAFTER, 4, TARGET)
    assert mapping.tolist() == [1, 1, 0, -1]
    proposer = TliProposer(mapping, Sampling(temperature=1.0), np.random.default_rng(0))
    draft = [proposer(LOGITS) for _ in range(3)]
    # The verifier takes the round: each target id once, its probability the sum of its pieces'.
    request = VerifyRequest(round=1, draft=b"".join(DRAFTER.piece(t) for t in draft),
                            draft_ids=proposer.target_ids, proposals=proposer.proposals)
    p = np.exp(LOGITS[:3]) / np.exp(LOGITS[:3]).sum()
    for q in request.proposals or []:
        assert sorted(q.ids) == [0, 1]
        assert dict(zip(q.ids, q.probs)) == pytest.approx({0: p[2], 1: p[0] + p[1]})


def test_the_proposal_is_the_distribution_the_draft_is_drawn_from():
    """q' must be what the device samples target ids from, or the verifier's rejection step is not
    lossless: over many draws, each target id comes up at its proposed probability."""
    proposer = TliProposer(intersection(DRAFTER, 4, TARGET), Sampling(temperature=1.0), np.random.default_rng(1))
    n = 4000
    for _ in range(n):
        proposer(LOGITS)
    q = proposer.proposals[0]
    drawn = np.bincount(proposer.target_ids, minlength=2) / n
    for tid, prob in zip(q.ids, q.probs):
        assert drawn[tid] == pytest.approx(prob, abs=0.03)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLED_VOCAB_CACHE", str(tmp_path / "vocab"))
    (tmp_path / "vocab").mkdir()
    return tmp_path / "vocab"


@pytest.mark.parametrize("vocab_hash", ["../planted", "/tmp/planted", "0a1b/../../planted", ""])
def test_a_vocab_hash_that_is_not_hex_never_names_a_file(cache, vocab_hash):
    planted = cache.parent / "planted.msgpack"  # outside the cache, where "../planted" points
    planted.write_bytes(msgpack.packb([b"planted"]))
    with VerifierClient("http://127.0.0.1:9", retries=0) as client, \
            pytest.raises(VerifierError, match="not a hex digest"):
        target_vocabulary(client, vocab_hash)
    assert sorted(p.name for p in cache.parent.iterdir()) == ["planted.msgpack", "vocab"]
    assert not any(cache.iterdir())


def test_a_hex_vocab_hash_reads_the_cache(cache):
    (cache / "0123456789abcdef0123456789abcdef.msgpack").write_bytes(msgpack.packb([b"a", b"\n"]))
    with VerifierClient("http://127.0.0.1:9", retries=0) as client:
        assert target_vocabulary(client, "0123456789abcdef0123456789abcdef") == [b"a", b"\n"]
