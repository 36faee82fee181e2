"""The device's drafter: a small GGUF model with its own tokenizer, through llama-cpp-python.

The drafter keeps its own token view of the committed text. New committed bytes are re-tokenized
with left context (shared alignment) and the KV cache is reused up to the longest common token
prefix with what it already evaluated, so an accepted draft costs no re-evaluation.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from shared.alignment import spell
from shared.llama_tokenizer import LlamaTokenizer, quiet_llama_logs
from shared.protocol import ChatMessage
from shared.utf8 import common_prefix_len


class Drafter:
    name = "gguf"

    def __init__(self, model_path: Path, n_ctx: int = 4096, n_threads: int | None = None, n_gpu_layers: int = 0,
                 slowdown_s: float = 0.0) -> None:
        quiet_llama_logs()
        self.model_path = Path(model_path)
        # Sleep per draft step: emulates a slower board (a Raspberry Pi) on a faster machine.
        self.slowdown_s = slowdown_s
        self.llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=n_threads or os.cpu_count(),
            n_gpu_layers=n_gpu_layers,
            verbose=False,
        )
        self.tokenizer = LlamaTokenizer(self.llm.model)
        self.tokens: list[int] = []  # prompt + committed text, in drafter ids

    def start(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> None:
        """Begin a generation; each side renders a chat with its own template."""
        self.tokens = self.tokenizer.prompt_ids(prompt, messages, transcript_fallback=True)

    def commit(self, text: bytes) -> list[int]:
        """Append committed text (complete UTF-8 from the verifier) to the drafter's context; the
        drafter ids it became."""
        new = spell(self.tokenizer, self.tokens, text)
        self.tokens += new
        return new

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
        if k <= 0 or not context:
            return [], []
        self._sync(context)
        out: list[int] = []
        confidences: list[float] = []
        for i in range(k):
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.tokenizer.n_vocab,)
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
                self.llm.eval([tok])
        return out, confidences

    def _sync(self, context: list[int]) -> None:
        """Make the KV cache hold ``context``, keeping the longest prefix it already has."""
        held = self.llm.input_ids[: self.llm.n_tokens].tolist()
        keep = min(common_prefix_len(held, context), len(context) - 1)  # re-eval the last
        self.llm.n_tokens = keep
        self.llm.eval(context[keep:])
