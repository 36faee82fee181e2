"""The device's drafter: a small GGUF model with its own tokenizer, through llama-cpp-python.

The drafter keeps its own token view of the committed text. New committed bytes are re-tokenized
with left context (shared alignment) and the KV cache is reused up to the longest common token
prefix with what it already evaluated, so an accepted draft costs no re-evaluation.

It runs on llama.cpp's low-level API: one context, one sequence, one token per decode and only the
last token's logits. The high-level ``Llama.eval`` does per-call bookkeeping (its token buffer, a
KV trim, a batch rebuilt) that cost about a tenth of each draft step of ``smollm2-135m`` on one
core (18.3 against 16.4 ms).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from shared.alignment import spell
from shared.llama_tokenizer import LlamaTokenizer, ModelLoadError, load_model, put_tokens
from shared.protocol import ChatMessage
from shared.utf8 import common_prefix_len

N_BATCH = 512  # tokens per decode: a prompt is evaluated in chunks of this
# A draft's catch-up beyond this many tokens (the last draft token and the verifier's bonus token,
# in steady drafting) is prefill: the prompt, or text committed by rounds without a draft.
STEADY_CATCH_UP = 2


class Drafter:
    name = "gguf"

    def __init__(self, model_path: Path, n_ctx: int = 4096, n_threads: int | None = None, n_gpu_layers: int = 0,
                 slowdown_s: float = 0.0) -> None:
        self.model_path = Path(model_path)
        # Sleep per draft step: emulates a slower board (a Raspberry Pi) on a faster machine.
        self.slowdown_s = slowdown_s
        self._model = load_model(model_path, n_gpu_layers)
        self.tokenizer = LlamaTokenizer(self._model)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = N_BATCH
        params.swa_full = True  # sliding-window layers (Gemma) must keep every position for rollback
        params.n_threads = params.n_threads_batch = n_threads or os.cpu_count() or 1
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ModelLoadError(f"llama.cpp could not make a context for {model_path} (out of memory?)")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.held: list[int] = []  # what the KV cache holds, by position
        self._tokens: list[int] = []  # prompt + committed text, in drafter ids
        self._unspelt = b""  # committed text after those, not yet needed in drafter ids
        # Seconds the last draft spent evaluating context it had not drafted itself (prefill): a
        # cost of starting or of resuming drafting, not of a draft step, so the controller's step
        # timing leaves it out (a first draft that pays the prompt's prefill is not a slow board).
        self.prefill_s = 0.0

    @property
    def tokens(self) -> list[int]:
        """The prompt and the committed text, in drafter ids."""
        if self._unspelt:
            self._tokens += spell(self.tokenizer, self._tokens, self._unspelt)
            self._unspelt = b""
        return self._tokens

    def start(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> None:
        """Begin a generation; each side renders a chat with its own template."""
        self._tokens = self.tokenizer.prompt_ids(prompt, messages, transcript_fallback=True)
        self._unspelt = b""

    def commit(self, text: bytes) -> list[int]:
        """Append committed text (complete UTF-8 from the verifier) to the drafter's context; the
        drafter ids it became."""
        new = spell(self.tokenizer, self.tokens, text)
        self._tokens += new
        return new

    def defer(self, text: bytes) -> None:
        """Append committed text whose drafter ids nothing needs yet: they are spelt, in one go,
        when the drafter next drafts. A round without a draft then costs the device no tokenizing
        (about 0.4 ms a round, 1-2% of a 25-ms round on a short link)."""
        self._unspelt += text

    def draft(self, k: int, pick: Callable[[np.ndarray], int | None] | None = None) -> list[int]:
        """Draft up to ``k`` tokens after the committed text; the ids of those that carry text.

        ``pick`` chooses each token from the drafter's logits (None ends the draft); greedy by
        default. A draft stops at the drafter's end-of-generation; other control tokens are
        evaluated but carry no text.
        """
        return self.greedy(k, pick=pick)[0]

    def greedy(self, k: int, after: Sequence[int] = (), stop: Callable[[float], bool] | None = None,
               pick: Callable[[np.ndarray], int | None] | None = None) -> tuple[list[int], list[float]]:
        """Up to ``k`` tokens after the committed text and then ``after`` (tokens drafted already,
        whose KV state is reused), with the drafter's top probability at each when ``stop`` is
        given: the draft ends before the first token that ``stop`` rejects (low confidence)."""
        context = self.tokens + list(after)
        self.prefill_s = 0.0
        if k <= 0 or not context:
            return [], []
        t0 = time.perf_counter()
        if self._sync(context) > STEADY_CATCH_UP:
            self.prefill_s = time.perf_counter() - t0
        out: list[int] = []
        confidences: list[float] = []
        for i in range(k):
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(self.tokenizer.n_vocab,)
            )
            tok = int(logits.argmax()) if pick is None else pick(logits)
            if tok is None or self.tokenizer.is_eog(tok):
                break
            if stop is not None:
                top = float(logits[tok])
                confidence = 1.0 / float(np.exp(logits - top).sum())  # softmax at its own argmax
                if stop(confidence):
                    break
            if not self.tokenizer.is_control(tok):
                out.append(tok)
                if stop is not None:
                    confidences.append(confidence)
            if self.slowdown_s:
                time.sleep(self.slowdown_s)
            if i + 1 < k:
                self._eval([tok])
        return out, confidences

    def _sync(self, context: list[int]) -> int:
        """Make the KV cache hold ``context``, keeping the longest prefix it already has, and
        evaluate the rest: at least the last token, whose logits come next. How many it evaluated."""
        keep = min(common_prefix_len(self.held, context), len(context) - 1)
        llama_cpp.llama_memory_seq_rm(self._mem, 0, keep, -1)
        del self.held[keep:]
        self._eval(context[keep:])
        return len(context) - keep

    def _eval(self, tokens: Sequence[int]) -> None:
        """Evaluate ``tokens`` after what the KV cache holds; the last one's logits are kept."""
        b = self._batch
        for start in range(0, len(tokens), N_BATCH):
            chunk = tokens[start : start + N_BATCH]
            put_tokens(b, 0, chunk, len(self.held), 0, len(chunk) - 1)
            b.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"the drafter's llama_decode failed with code {rc} ({len(chunk)} tokens)")
            self.held += chunk

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None

    def __del__(self) -> None:
        self.close()
