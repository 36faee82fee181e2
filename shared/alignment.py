"""Text/byte alignment between tokenizers: the heart of cross-vocabulary speculation.

Both sides hold text as a sequence of their *own* token ids and receive new text as bytes from the
other side. ``continuation_ids`` turns those bytes into ids that extend the existing sequence,
re-tokenizing them *with left context* (a look-behind window of the last ids) so that leading spaces,
SentencePiece word starts and byte-level BPE merges come out the way the model would have produced
them. Existing ids never change: when the tokenizer wants to merge across the boundary (``"hel"`` +
``"lo"`` -> ``"hello"``), the new bytes are tokenized on their own, which only costs acceptance.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from shared.utf8 import starts_mid_character

DEFAULT_WINDOW = 8


class Tokenizer(Protocol):
    """What alignment needs from a tokenizer. ``encode`` adds no BOS and parses no special tokens;
    ``piece`` is the exact bytes a token contributes to text (empty for control tokens)."""

    def encode(self, text: bytes) -> list[int]: ...

    def piece(self, token: int) -> bytes: ...


def text_of(tok: Tokenizer, ids: Sequence[int]) -> bytes:
    return b"".join(tok.piece(t) for t in ids)


def matching_prefix(tok: Tokenizer, ids: Sequence[int], text: bytes) -> list[int]:
    """The leading ``ids`` whose bytes spell a prefix of ``text`` (guards against a tokenizer that
    inserts a dummy prefix space or otherwise does not reproduce its input)."""
    out: list[int] = []
    pos = 0
    for t in ids:
        p = tok.piece(t)
        if not p or text[pos : pos + len(p)] != p:
            break
        out.append(t)
        pos += len(p)
    return out


def _window_start(tok: Tokenizer, ids: Sequence[int], window: int) -> tuple[int, bytes]:
    """Start of the look-behind window and its bytes; never starts inside a UTF-8 character."""
    start = max(0, len(ids) - window)
    ctx = text_of(tok, ids[start:])
    while start > 0 and starts_mid_character(ctx):
        start -= 1
        ctx = tok.piece(ids[start]) + ctx
    return start, ctx


def continuation_ids(
    tok: Tokenizer, existing: Sequence[int], text: bytes, window: int = DEFAULT_WINDOW
) -> list[int]:
    """Ids that spell ``text`` (or the longest prefix of it that can be aligned) after ``existing``.

    Tokenizes ``window`` ids of left context plus ``text`` and keeps what follows the first token
    boundary that falls exactly at the end of the context.
    """
    if not text:
        return []
    _, ctx = _window_start(tok, existing, window)
    ids = tok.encode(ctx + text)
    pos = 0
    for k, t in enumerate(ids):
        if pos == len(ctx):
            return matching_prefix(tok, ids[k:], text)
        if pos > len(ctx):
            break
        pos += len(tok.piece(t))
    # Boundary merge: the tokenizer spans the end of the existing text. Tokenize the new bytes alone.
    return matching_prefix(tok, tok.encode(text), text)


def spell(tok: Tokenizer, existing: Sequence[int], text: bytes, window: int = DEFAULT_WINDOW) -> list[int]:
    """Like ``continuation_ids`` but covering *all* of ``text`` (a model's own context must not
    lose bytes): what left-context alignment cannot place is tokenized piecewise on its own."""
    ids = continuation_ids(tok, existing, text, window)
    covered = len(text_of(tok, ids))
    while covered < len(text):
        more = matching_prefix(tok, tok.encode(text[covered:]), text[covered:])
        if not more:
            raise ValueError(f"the tokenizer cannot spell {text[covered:covered + 16]!r}")
        ids += more
        covered += len(text_of(tok, more))
    return ids


def accepted_pieces(pieces: Sequence[bytes], accepted_bytes: int) -> int:
    """How many draft tokens lie wholly inside the accepted byte prefix."""
    n, end = 0, 0
    for p in pieces:
        end += len(p)
        if end > accepted_bytes:
            break
        n += 1
    return n
