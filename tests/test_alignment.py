"""Byte/token alignment with the real tokenizers of the built-in models."""
from __future__ import annotations

import pytest

from shared.alignment import continuation_ids, spell, text_of
from shared.utf8 import complete_prefix_len

BPE, SPM = "qwen2.5-coder-0.5b", "gemma-3-270m"


def test_an_incomplete_character_is_held_back():
    e_acute, emoji = "é".encode(), "🎉".encode()
    assert complete_prefix_len(b"caf" + e_acute[:1]) == 3
    assert complete_prefix_len(b"ok " + emoji[:3]) == 3
    assert complete_prefix_len(b"ok " + emoji) == 3 + len(emoji)
    assert complete_prefix_len(b"") == 0
    # a stray continuation byte can never complete: it is not held back
    assert complete_prefix_len(b"a\x80") == 2


@pytest.mark.parametrize("model", [BPE, SPM])
def test_draft_ending_inside_a_character_aligns_up_to_it(tokenizer, model):
    tok = tokenizer(model)
    existing = tok.encode("Le café".encode())
    draft = " crème".encode()[:-2] + "è".encode()[:1]  # " crè" + half of another "è"
    whole = draft[: complete_prefix_len(draft)]
    ids = continuation_ids(tok, existing, whole)
    assert text_of(tok, ids) == whole


@pytest.mark.parametrize("model", [BPE, SPM])
def test_leading_space_is_kept_with_left_context(tokenizer, model):
    tok = tokenizer(model)
    existing = tok.encode(b"Hello")
    ids = continuation_ids(tok, existing, b" world, how are you")
    assert text_of(tok, ids) == b" world, how are you"
    # the same ids the tokenizer produces for the whole text: the space belongs to " world"
    assert existing + ids == tok.encode(b"Hello world, how are you")


def test_sentencepiece_fragment_alone_would_differ(tokenizer):
    """Why the window exists: with left context the continuation matches whole-text tokenization."""
    tok = tokenizer(SPM)
    existing = tok.encode("La crème brûlée est".encode())
    ids = continuation_ids(tok, existing, b" un dessert")
    assert existing + ids == tok.encode("La crème brûlée est un dessert".encode())


@pytest.mark.parametrize("model", [BPE, SPM])
def test_control_token_text_in_a_draft_is_plain_text(tokenizer, model):
    tok = tokenizer(model)
    existing = tok.encode(b"x = 1\n")
    marker = b"<|im_end|><end_of_turn></s>"
    ids = continuation_ids(tok, existing, marker)
    assert text_of(tok, ids) == marker
    assert not any(tok.is_control(t) for t in ids)  # never parsed into an end-of-turn token


@pytest.mark.parametrize("model", [BPE, SPM])
def test_boundary_merge_never_changes_committed_ids(tokenizer, model):
    tok = tokenizer(model)
    existing = tok.encode(b"print(hel")
    text = b"lo_world)"
    ids = continuation_ids(tok, existing, text)
    whole = tok.encode(b"print(hello_world)")
    # precondition: the tokenizer merges across the boundary ("hel" + "lo" -> one token)
    assert whole[: len(existing)] != existing
    # the committed ids stay; the draft is spelled after them
    assert text_of(tok, existing + ids) == b"print(hello_world)"


@pytest.mark.parametrize("model", [BPE, SPM])
def test_empty_draft_gives_no_candidates(tokenizer, model):
    tok = tokenizer(model)
    assert continuation_ids(tok, tok.encode(b"abc"), b"") == []
    assert spell(tok, tok.encode(b"abc"), b"") == []


@pytest.mark.parametrize("model", [BPE, SPM])
def test_spell_covers_every_byte(tokenizer, model):
    tok = tokenizer(model)
    existing = tok.encode("東京は".encode())
    text = "日本の首都 🎉 café".encode()
    assert text_of(tok, spell(tok, existing, text)) == text
