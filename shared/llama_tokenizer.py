"""The llama.cpp model loader, and the tokenizer and chat template of a model, for both the drafter and the verifier.

The one module of ``shared`` that imports llama-cpp-python (both the ``agent`` and ``verifier``
extras install it); the protocol, codec and alignment helpers do not depend on it.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Any, cast

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from shared.chat import ChatTemplateError, chat_transcript
from shared.protocol import ChatMessage

_VOCAB_TYPES = {1: "SentencePiece", 2: "byte-level BPE", 3: "WordPiece", 4: "Unigram", 5: "RWKV"}


_GGML_LOG_LEVEL_ERROR = 4


@llama_cpp.llama_log_callback
def _errors_only(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == _GGML_LOG_LEVEL_ERROR:
        os.write(2, text)


def quiet_llama_logs() -> None:
    """llama.cpp logs every model load to stderr; keep its errors only."""
    llama_cpp.llama_log_set(_errors_only, ctypes.c_void_p(0))


class ModelLoadError(OSError):
    """llama.cpp could not load a model file (or make a context for it)."""


def load_model(path: os.PathLike[str] | str, n_gpu_layers: int = 0, vocab_only: bool = False) -> llama_cpp.llama_model_p:
    """A GGUF model through llama.cpp (the drafter's, the target's); ``vocab_only``: its tokenizer
    alone, without the weights."""
    quiet_llama_logs()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.vocab_only = vocab_only
    model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
    if not model:
        raise ModelLoadError(f"llama.cpp could not load {path}")
    return model


def put_tokens(batch: Any, at: int, tokens: Sequence[int], pos: int, seq: int,
               logits_from: int) -> None:
    """Write ``tokens`` into ``batch`` from index ``at``: positions from ``pos`` in sequence ``seq``,
    logits for the tokens from index ``logits_from`` of them on (the drafter's, the verifier's).
    ``batch`` is a ``llama_cpp.llama_batch``, whose ctypes fields its stubs type too narrowly."""
    for j, tok in enumerate(tokens):
        batch.token[at + j] = tok
        batch.pos[at + j] = pos + j
        batch.n_seq_id[at + j] = 1
        batch.seq_id[at + j][0] = seq
        batch.logits[at + j] = j >= logits_from


class LlamaTokenizer:
    """The tokenizer of one loaded llama.cpp model: encode/decode bytes and render chat prompts.

    Pieces are cached: alignment asks for the same ids over and over.
    """

    def __init__(self, model: llama_cpp.llama_model_p) -> None:
        self._model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.bos: int = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos: int = llama_cpp.llama_vocab_eos(self.vocab)
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.kind: str = _VOCAB_TYPES.get(llama_cpp.llama_vocab_type(self.vocab), "unknown")
        self._pieces: dict[int, bytes] = {}
        template = llama_cpp.llama_model_chat_template(model, None)
        self.chat_template: str | None = template.decode() if template else None

    # --- the alignment Tokenizer protocol -------------------------------------------------
    def encode(self, text: bytes) -> list[int]:
        """Plain text to ids: no BOS, special-token syntax is treated as text."""
        return self.tokenize(text, add_bos=False, parse_special=False)

    def piece(self, token: int) -> bytes:
        """Bytes the token contributes to the text; empty for control tokens (BOS, EOS, turn markers)."""
        p = self._pieces.get(token)
        if p is None:
            p = self._pieces[token] = self._token_bytes(token, special=False)
        return p

    # ---------------------------------------------------------------------------------------
    def tokenize(self, text: bytes, add_bos: bool, parse_special: bool) -> list[int]:
        cap = len(text) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, text, len(text), buf, cap, add_bos, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, text, len(text), buf, cap, add_bos, parse_special)
        return list(buf[:n])

    def _token_bytes(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def is_control(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_control(self.vocab, token)) or self.is_eog(token)

    def prompt_ids(
        self, prompt: str | None, messages: Sequence[ChatMessage] | None, transcript_fallback: bool = False
    ) -> list[int]:
        """Ids of a raw prompt (continued as is) or of a chat rendered with this model's template,
        ending where the assistant's reply begins.

        ``transcript_fallback`` lets a model without a template (a base-model drafter) read the
        chat as a plain transcript: its drafts only need to be plausible, never exact.
        """
        if messages is None:
            assert prompt is not None
            return self.tokenize(prompt.encode(), add_bos=self.add_bos, parse_special=False)
        if not self.chat_template and transcript_fallback:
            text = chat_transcript(list(messages)).encode()
            return self.tokenize(text, add_bos=self.add_bos, parse_special=False)
        rendered = self.render_chat(messages)
        bos_text = self._token_bytes(self.bos, special=True) if self.bos >= 0 else b""
        # Templates usually write the BOS themselves; never add a second one.
        add_bos = self.add_bos and not (bos_text and rendered.startswith(bos_text))
        return self.tokenize(rendered, add_bos=add_bos, parse_special=True)

    def render_chat(self, messages: Sequence[ChatMessage]) -> bytes:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; send a raw prompt instead")
        bos = self._token_bytes(self.bos, special=True).decode(errors="replace") if self.bos >= 0 else ""
        eos = self._token_bytes(self.eos, special=True).decode(errors="replace") if self.eos >= 0 else ""
        try:
            formatter = Jinja2ChatFormatter(self.chat_template, eos_token=eos, bos_token=bos)
            result = formatter(messages=[cast(Any, m.model_dump()) for m in messages])
        except Exception as e:  # jinja raises many types, including on template logic errors
            raise ChatTemplateError(f"chat template failed to render: {e}") from None
        return result.prompt.encode()
