"""What drafts on the device, behind one interface for the agent's round loop.

- ``ModelSource``: a GGUF drafter (llama.cpp), greedy, with the drafter's confidence per token for
  the draft controller, and *pipelined drafting*: while a round is in flight it keeps drafting as
  if the whole draft will be accepted. When the committed text is a prefix of what it drafted
  ahead, the rest is the exact greedy continuation of the new context (same tokens, same KV
  state), so the next draft starts with it for free (or was already sent, in a chained round);
  otherwise it is dropped.
- ``NgramSource``: the model-free n-gram table (``edge_agent.ngram``); its tokens are bytes.
- ``HierarchicalSource`` (``ngram+NAME``): the n-gram proposal when it is long (a match of the
  long context) and confident (its measured acceptance, scored every round whether it was used or
  not, within 10% of the model's), extended by the model after it; the model alone otherwise. Its
  tokens are the model's.

Only the verifier commits: every source just proposes bytes, so all of them are lossless.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edge_agent.drafter import Drafter
from edge_agent.ngram import NgramDrafter
from shared.alignment import accepted_pieces, spell
from shared.protocol import ChatMessage
from shared.utf8 import common_prefix_len, complete_prefix_len

Stop = Callable[[float], bool]  # True: the token at this confidence ends the draft
PRIOR_ACCEPTANCE = 0.5
MIN_NGRAM_BYTES = 8  # shorter n-gram matches are not worth a round of their own
NGRAM_PREFERENCE = 0.9  # the n-gram wins at 90% of the model's measured acceptance (it is free)


@dataclass
class Draft:
    pieces: list[bytes]  # the bytes of each draft token
    confidences: list[float] = field(default_factory=list)  # per token, where the source measures it
    source: str = ""  # "gguf" or "ngram": what opened it
    ready: int = 0  # leading tokens drafted ahead, during the previous round
    ngram_tokens: int = 0  # leading tokens from the n-gram table (the rest: the model's extension)
    prefill_s: float = 0.0  # of the drafting time, the drafter's catch-up on context (not draft steps)

    @property
    def text(self) -> bytes:
        return b"".join(self.pieces)


class DraftSource(Protocol):
    name: str

    def start(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> None: ...

    def propose(self, k: int, stop: Stop | None = None) -> Draft:
        """Up to ``k`` tokens after the committed text."""
        ...

    def commit(self, text: bytes) -> None:
        """Committed text from the verifier, appended to the source's context."""
        ...

    def feedback(self, draft: Draft, accepted: int) -> None:
        """How many leading tokens of ``draft`` the verifier accepted."""
        ...


class ModelSource:
    name = "gguf"

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.sent: list[tuple[int, float]] = []  # the draft in flight: ids and confidences
        self.ahead: list[tuple[int, float]] = []  # drafted after it while it was in flight
        self.carried: list[tuple[int, float]] = []  # the part of those that the answer confirmed

    def start(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> None:
        self.drafter.start(prompt, messages)
        self.sent, self.ahead, self.carried = [], [], []

    def propose(self, k: int, stop: Stop | None = None) -> Draft:
        carried, self.carried = self.carried, []
        ready: list[tuple[int, float]] = []
        stopped = False
        for tok, conf in carried[:k]:
            if stop is not None and stop(conf):
                stopped = True
                break
            ready.append((tok, conf))
        ids = [t for t, _ in ready]
        confidences = [c for _, c in ready]
        # What was drafted ahead beyond this draft stays its continuation: the next look-ahead goes
        # on from it (nothing is left when the draft needs more than was carried).
        self.ahead = carried[len(ready) :]
        prefill_s = 0.0
        if not stopped and k > len(ids):
            more, more_conf = self.drafter.greedy(k - len(ids), after=ids, stop=stop)
            ids += more
            confidences += more_conf if stop is not None else [1.0] * len(more)
            prefill_s = self.drafter.prefill_s
        self.sent = list(zip(ids, confidences))
        pieces = [self.drafter.tokenizer.piece(t) for t in ids]
        return Draft(pieces, confidences, self.name, ready=len(ready), prefill_s=prefill_s)

    def take_sent(self, text: bytes) -> Draft | None:
        """The draft of a chained round, already sent: ``text``, the bytes of the leading tokens
        carried over from the look-ahead. None (and the look-ahead dropped) where the committed
        text cut one of those tokens: the round's draft then is not a run of drafter tokens."""
        carried, self.carried = self.carried, []
        pieces = [self.drafter.tokenizer.piece(t) for t, _ in carried]
        n = accepted_pieces(pieces, len(text))
        if b"".join(pieces[:n]) != text:
            self.sent, self.ahead = [], []
            return None
        self.sent, self.ahead = carried[:n], carried[n:]
        return Draft(pieces[:n], [c for _, c in self.sent], self.name, ready=n)

    def ahead_text(self, n: int) -> bytes:
        """The first ``n`` tokens drafted ahead, as bytes."""
        return b"".join(self.drafter.tokenizer.piece(t) for t, _ in self.ahead[:n])

    def look_ahead(self, in_flight: Callable[[], bool], limit: int) -> int:
        """Draft on after the draft in flight (and what was drafted ahead of it already), one token
        at a time, until its answer arrives (``in_flight`` turns false) or ``limit`` tokens are
        ahead; how many it drafted."""
        drafted = 0
        while in_flight() and len(self.ahead) < limit:
            context = [t for t, _ in self.sent + self.ahead]
            tok, conf = self.drafter.greedy(1, after=context, stop=lambda c: False)
            if not tok:
                break
            self.ahead.append((tok[0], conf[0]))
            drafted += 1
        return drafted

    def commit(self, text: bytes) -> None:
        predicted = self.sent + self.ahead
        if not predicted:  # a round without a draft: no look-ahead to confirm, the ids can wait
            self.drafter.defer(text)
            self.carried = []
            return
        new = self.drafter.commit(text)
        confirmed = bool(new) and [t for t, _ in predicted[: len(new)]] == new
        self.carried = predicted[len(new) :] if confirmed else []
        self.sent, self.ahead = [], []

    def feedback(self, draft: Draft, accepted: int) -> None:
        pass


def gguf_drafter(source: Drafter | DraftSource | None) -> Drafter | None:
    """The GGUF model behind a draft source, if it has one (for the local fallback)."""
    if isinstance(source, Drafter):
        return source
    if isinstance(source, ModelSource):
        return source.drafter
    if isinstance(source, HierarchicalSource):
        return source.model.drafter
    return None


class NgramSource:
    name = "ngram"

    def __init__(self, table: NgramDrafter | None = None) -> None:
        self.table = table or NgramDrafter()

    def start(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> None:
        self.table.start(prompt, messages)

    def propose(self, k: int, stop: Stop | None = None) -> Draft:
        return Draft(self.table.draft_pieces(k), source=self.name)

    def commit(self, text: bytes) -> None:
        self.table.commit(text)

    def feedback(self, draft: Draft, accepted: int) -> None:
        pass


@dataclass
class _Rate:
    """A source's measured chance that a draft position is accepted once the ones before it were
    (a prior of a few positions at 0.5)."""

    judged: float = 4.0
    accepted: float = 4.0 * PRIOR_ACCEPTANCE

    @property
    def value(self) -> float:
        return self.accepted / self.judged

    def observe(self, accepted: int, rejected: bool) -> None:
        """``accepted`` leading positions, then one rejected (or none judged beyond them)."""
        self.judged += accepted + rejected
        self.accepted += accepted


class HierarchicalSource:
    name = "ngram+gguf"

    def __init__(self, model: ModelSource, table: NgramDrafter | None = None) -> None:
        self.model = model
        self.table = table or NgramDrafter()
        self.rates = {"ngram": _Rate(), "gguf": _Rate()}
        self.chosen = {"ngram": 0, "gguf": 0}  # rounds each source opened
        # The n-gram proposal of a round the model drafted: scored against what the verifier
        # committed, so that the n-gram's acceptance is measured every round, chosen or not.
        self.shadow: list[bytes] = []

    def start(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> None:
        self.model.start(prompt, messages)
        self.table.start(prompt, messages)

    def propose(self, k: int, stop: Stop | None = None) -> Draft:
        tok = self.model.drafter.tokenizer
        proposal = self.table.propose(k * 4)  # about 4 bytes a token: enough to cover k tokens
        text = proposal.text[: complete_prefix_len(proposal.text[: proposal.long_bytes])]
        ids = spell(tok, self.model.drafter.tokens, text)[:k] if len(text) >= MIN_NGRAM_BYTES else []
        # Taken when long enough and about as likely to be accepted as the model's tokens: it costs
        # no drafting time, and the model extends it to k tokens.
        if ids and self.rates["ngram"].value >= NGRAM_PREFERENCE * self.rates["gguf"].value:
            more, _ = self.model.drafter.greedy(k - len(ids), after=ids) if k > len(ids) else ([], [])
            self.chosen["ngram"] += 1
            self.shadow = []
            return Draft([tok.piece(t) for t in ids + more], source="ngram", ngram_tokens=len(ids),
                         prefill_s=self.model.drafter.prefill_s if more else 0.0)
        self.chosen["gguf"] += 1
        self.shadow = [tok.piece(t) for t in ids]
        return self.model.propose(k, stop)

    def commit(self, text: bytes) -> None:
        if self.shadow:  # judged only as far as the committed text reaches
            shadow = b"".join(self.shadow)
            agree = common_prefix_len(shadow, text)
            matched = accepted_pieces(self.shadow, agree)
            self.rates["ngram"].observe(matched, agree < min(len(shadow), len(text)))
            self.shadow = []
        self.model.commit(text)
        self.table.commit(text)

    def feedback(self, draft: Draft, accepted: int) -> None:
        """Measured per source: for an n-gram round, only the n-gram's own tokens."""
        n = draft.ngram_tokens if draft.source == "ngram" else len(draft.pieces)
        self.rates[draft.source].observe(min(accepted, n), accepted < n)
