"""Target model on llama.cpp through llama-cpp-python's low-level API.

The high-level ``Llama`` class holds a single sequence; verifying many devices in one forward pass
needs a context with ``n_seq_max`` sequences, one per session slot, and per-sequence KV rollback.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from shared.llama_tokenizer import LlamaTokenizer, load_model, put_tokens
from verifier_server.acceptance import LogitRows
from verifier_server.llama.forward import ForwardItem
from verifier_server.runner import RunnerError


class BackendError(RunnerError):
    """The model could not be loaded or a forward pass failed."""


class _Rows:
    """An item's logits rows as views into llama.cpp's output buffer (valid until the next decode):
    an acceptance rule reads the rows it needs, and nothing is copied."""

    def __init__(self, ctx: llama_cpp.llama_context_p, start: int, n: int, n_vocab: int) -> None:
        self._ctx, self._start, self._n, self._n_vocab = ctx, start, n, n_vocab

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j: int) -> np.ndarray:
        if not 0 <= j < self._n:
            raise IndexError(f"row {j} of {self._n}")
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, self._start + j)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))


class LlamaBackend:
    name = "llama.cpp"

    def __init__(
        self,
        model_path: Path,
        model_name: str,
        n_slots: int = 8,
        ctx_per_slot: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
    ) -> None:
        self.model_name = model_name
        self.n_slots = n_slots
        self.ctx_per_slot = ctx_per_slot
        self.max_batch_tokens = n_batch
        self._model = load_model(model_path, n_gpu_layers)
        self.tokenizer = LlamaTokenizer(self._model)
        self.n_params = int(llama_cpp.llama_model_n_params(self._model))

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_slots * ctx_per_slot
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_slots
        cparams.kv_unified = True  # one pool: a session may use what idle slots leave free
        cparams.swa_full = True  # sliding-window layers must keep every position for rollback
        threads = n_threads or os.cpu_count() or 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise BackendError("llama.cpp could not create a context (out of memory?)")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._check_rollback()

    def _check_rollback(self) -> None:
        """Rolling back rejected positions must work for this model (it does not for recurrent ones)."""
        tokens = self.tokenizer.encode(b"a b")[:2] or [0, 0]
        self._decode([ForwardItem(0, 0, tokens, 0)])
        ok = llama_cpp.llama_memory_seq_rm(self._mem, 0, 1, -1)
        llama_cpp.llama_memory_clear(self._mem, True)
        if not ok:
            raise BackendError(f"{self.model_name}: KV rollback is not supported for this model")

    def forward(self, items: Sequence[ForwardItem]) -> list[LogitRows]:
        for it in items:
            llama_cpp.llama_memory_seq_rm(self._mem, it.slot, it.pos, -1)
        starts = self._decode(items)
        return [_Rows(self._ctx, start, it.n_logits, self.tokenizer.n_vocab) for it, start in zip(items, starts)]

    def _decode(self, items: Sequence[ForwardItem]) -> list[int]:
        """Fill the batch and decode; returns each item's first logits row index in the batch."""
        b = self._batch
        n = 0
        starts = []
        for it in items:
            first_logit = len(it.tokens) - it.n_logits
            starts.append(n + first_logit)
            if n + len(it.tokens) <= self.max_batch_tokens:
                put_tokens(b, n, it.tokens, it.pos, it.slot, first_logit)
            n += len(it.tokens)
        if n > self.max_batch_tokens:
            raise BackendError(f"batch of {n} tokens exceeds n_batch={self.max_batch_tokens}")
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise BackendError(f"llama_decode failed with code {rc} ({n} tokens)")
        return starts

    def save_state(self, slot: int) -> bytes:
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, slot)
        return bytes(buf[:n])

    def load_state(self, slot: int, state: bytes) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, slot, -1, -1)
        src = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if llama_cpp.llama_state_seq_set_data(self._ctx, src, len(state), slot) != len(state):
            raise BackendError(f"could not restore a parked session into slot {slot}")

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None
