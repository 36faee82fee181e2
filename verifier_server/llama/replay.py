"""A backend that replays a target's recorded greedy decodings instead of running it: benchmarks only.

A device-side benchmark needs a verifier with a GPU's timing and the target's real decisions. A
1.5B target verifies a round in about 22 ms on an H100 (``bench/gpu_curve_h100.json``); on this
kind of CPU the same pass takes hundreds of ms, longer than the GPU's whole round, so padding real
passes (``FixedCostBackend``) cannot emulate it. Greedy verification only reads the target's logits
along the committed text, and that text is the target's own greedy output. So recordings of plain
greedy decoding, made with the real model (``bench.target`` makes them), give exactly the
decisions the real model would, and ``--emulate-pass-ms`` gives each pass the GPU's time.

A row whose context is off every recording (the tail of a rejected draft, the start-up
calibration, a prompt that was not recorded) points at end-of-generation: nothing is committed
from it except, for an unrecorded prompt, the end of its session.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from shared.llama_tokenizer import LlamaTokenizer, load_model
from shared.utf8 import common_prefix_len
from verifier_server.acceptance import LogitRows
from verifier_server.llama.forward import ForwardItem
from verifier_server.runner import TargetTokenizer

REPLAY_LOGIT = 30.0  # the recorded token's logit; every other token's is 0


def load_recordings(path: Path) -> list[list[int]]:
    """JSON lines, each ``{"ids": [...]}``: a prompt's ids followed by the target's greedy ids."""
    recordings = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        ids = record.get("ids") if isinstance(record, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"{path}:{n}: expected {{\"ids\": [int, ...]}}")
        recordings.append(ids)
    return recordings


class _OneHotRows:
    def __init__(self, tokens: list[int], n_vocab: int) -> None:
        self._tokens, self._n_vocab = tokens, n_vocab

    def __len__(self) -> int:
        return len(self._tokens)

    def __getitem__(self, j: int) -> np.ndarray:
        row = np.zeros(self._n_vocab, dtype=np.float32)
        row[self._tokens[j]] = REPLAY_LOGIT
        return row


class ReplayBackend:
    """The target's tokenizer (its vocabulary only: no weights are loaded) and, per slot, the ids it
    holds; each logits row names the recorded next token of that context."""

    name = "replay"

    def __init__(self, model_path: Path, model_name: str, recordings: list[list[int]], n_slots: int = 8,
                 ctx_per_slot: int = 2048, n_batch: int = 512) -> None:
        self._model: llama_cpp.llama_model_p | None = load_model(model_path, vocab_only=True)
        self._tokenizer = LlamaTokenizer(self._model)
        self.model_name = f"{model_name} (replayed)"
        self.n_slots, self.ctx_per_slot, self.max_batch_tokens = n_slots, ctx_per_slot, n_batch
        self.n_params = 0  # no weights are loaded
        self.recordings = recordings
        self.held: list[list[int]] = [[] for _ in range(n_slots)]

    @property
    def tokenizer(self) -> TargetTokenizer:
        return self._tokenizer

    def forward(self, items: Sequence[ForwardItem]) -> list[LogitRows]:
        """Per item, the recording that agrees longest with what the slot holds: a row's context
        that lies within that agreement is recorded (greedy decoding gives one continuation per
        context), and its next token is the recording's."""
        out: list[LogitRows] = []
        for it in items:
            held = self.held[it.slot]
            del held[it.pos :]
            held += it.tokens
            ids = max(self.recordings, key=lambda r: common_prefix_len(r, held), default=[])
            agree = common_prefix_len(ids, held)
            nexts = [ids[p + 1] if p < agree and p + 1 < len(ids) else self._tokenizer.eos
                     for p in range(len(held) - it.n_logits, len(held))]
            out.append(_OneHotRows(nexts, self._tokenizer.n_vocab))
        return out

    def save_state(self, slot: int) -> bytes:
        return np.array(self.held[slot], dtype=np.int32).tobytes()

    def load_state(self, slot: int, state: bytes) -> None:
        self.held[slot] = np.frombuffer(state, dtype=np.int32).tolist()

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None
