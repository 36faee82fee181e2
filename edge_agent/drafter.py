"""The device's drafter: a small GGUF model with its own tokenizer, through llama-cpp-python.

The drafter keeps its own token view of the committed text. New committed bytes are re-tokenized
with left context (shared alignment) and the KV cache is reused up to the longest common token
prefix with what it already evaluated, so an accepted draft costs no re-evaluation.

It drafts in several KV sequences of one llama.cpp context: sequence 0 for the committed text and
the draft, and ``branches`` more for drafts of other outcomes (a hedge: the draft in flight
rejected at a position, for the drafter's runner-up there). A sequence that needs a context takes
the longest prefix of it that *any* sequence holds; llama.cpp shares those KV cells between the
sequences, so switching to a branch that turned out right re-evaluates nothing. (The high-level
``Llama`` class holds one sequence, hence the low-level API.)
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import llama_cpp
import numpy as np

from shared.alignment import spell
from shared.llama_tokenizer import LlamaTokenizer, ModelLoadError, load_model
from shared.protocol import ChatMessage
from shared.utf8 import common_prefix_len

N_BATCH = 512  # tokens per decode: a prompt is evaluated in chunks of this
BRANCHES = 2  # KV sequences for hedges, besides the main one


class Step(NamedTuple):
    """One drafted token, with what the drafter thought of it: the softmax probability of its
    choice and of its runner-up (the likeliest other outcome, which a hedge drafts on)."""

    token: int
    confidence: float
    runner_up: int = -1
    runner_up_p: float = 0.0


def _step(logits: np.ndarray, tok: int) -> Step:
    probs = np.exp(logits - float(logits.max()))
    probs /= probs.sum()
    confidence = float(probs[tok])
    probs[tok] = -1.0
    runner_up = int(probs.argmax())
    return Step(tok, confidence, runner_up, float(probs[runner_up]))


class Drafter:
    name = "gguf"

    def __init__(self, model_path: Path, n_ctx: int = 4096, n_threads: int | None = None, n_gpu_layers: int = 0,
                 slowdown_s: float = 0.0, branches: int = BRANCHES) -> None:
        self.model_path = Path(model_path)
        # Sleep per draft step: emulates a slower board (a Raspberry Pi) on a faster machine.
        self.slowdown_s = slowdown_s
        self._model = load_model(model_path, n_gpu_layers)
        self.tokenizer = LlamaTokenizer(self._model)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = 1 + branches
        params.kv_unified = True  # one pool: a branch shares the cells of the prefix it starts from
        params.swa_full = True  # sliding-window layers (Gemma) must keep every position for rollback
        params.n_threads = params.n_threads_batch = n_threads or os.cpu_count() or 1
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ModelLoadError(f"llama.cpp could not make a context for {model_path} (out of memory?)")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.held: list[list[int]] = [[] for _ in range(1 + branches)]  # what each sequence's KV holds
        self.tokens: list[int] = []  # prompt + committed text, in drafter ids

    @property
    def branches(self) -> int:
        return len(self.held) - 1

    def start(self, prompt: str | None, messages: Sequence[ChatMessage] | None) -> None:
        """Begin a generation; each side renders a chat with its own template. Branches of the
        last generation are dropped, so that their cells go back to the pool."""
        self.tokens = self.tokenizer.prompt_ids(prompt, messages, transcript_fallback=True)
        for seq in range(1, len(self.held)):
            llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
            self.held[seq] = []

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
        return [s.token for s in self.greedy(k, pick=pick)]

    def greedy(self, k: int, after: Sequence[int] = (), stop: Callable[[float], bool] | None = None,
               pick: Callable[[np.ndarray], int | None] | None = None, seq: int = 0) -> list[Step]:
        """Up to ``k`` tokens after the committed text and then ``after`` (tokens drafted already,
        whose KV state is reused), drafted in KV sequence ``seq``: the draft ends before the first
        token that ``stop`` rejects (its confidence is low)."""
        context = self.tokens + list(after)
        if k <= 0 or not context:
            return []
        self._sync(seq, context)
        out: list[Step] = []
        for i in range(k):
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(self.tokenizer.n_vocab,)
            )
            tok = int(logits.argmax()) if pick is None else pick(logits)
            if tok is None or self.tokenizer.is_eog(tok):
                break
            step = _step(logits, tok)
            if stop is not None and stop(step.confidence):
                break
            if not self.tokenizer.is_control(tok):
                out.append(step)
            if self.slowdown_s:
                time.sleep(self.slowdown_s)
            if i + 1 < k:
                self._eval(seq, [tok])
        return out

    def _sync(self, seq: int, context: list[int]) -> None:
        """Make sequence ``seq`` hold ``context``, keeping the longest prefix it already has, or
        that another sequence has (shared cells, nothing evaluated), and evaluate the rest: at
        least the last token, whose logits come next."""
        limit = len(context) - 1
        keep = min(common_prefix_len(self.held[seq], context), limit)
        llama_cpp.llama_memory_seq_rm(self._mem, seq, keep, -1)
        del self.held[seq][keep:]
        donor = max(range(len(self.held)), key=lambda s: common_prefix_len(self.held[s], context))
        shared = min(common_prefix_len(self.held[donor], context), limit)
        if shared > keep:
            llama_cpp.llama_memory_seq_cp(self._mem, donor, seq, keep, shared)
            self.held[seq] += context[keep:shared]
            keep = shared
        self._eval(seq, context[keep:])

    def _eval(self, seq: int, tokens: Sequence[int]) -> None:
        """Evaluate ``tokens`` after what sequence ``seq`` holds; the last one's logits are kept."""
        held, b = self.held[seq], self._batch
        for start in range(0, len(tokens), N_BATCH):
            chunk = tokens[start : start + N_BATCH]
            for j, tok in enumerate(chunk):
                b.token[j] = tok
                b.pos[j] = len(held) + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = seq
                b.logits[j] = j == len(chunk) - 1
            b.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"the drafter's llama_decode failed with code {rc} ({len(chunk)} tokens)")
            held += chunk

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None

    def __del__(self) -> None:
        self.close()
