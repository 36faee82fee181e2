"""The vLLM engine's options: ``sled-verifier serve --engine vllm`` flags, checked before vLLM
loads, and the engine arguments they become. Importable without vLLM (the CLI defines the flags
on every install)."""
from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EXECUTOR_BACKENDS = ("mp", "ray", "uni")


@dataclass(frozen=True)
class VllmOptions:
    """What the verifier passes through to vLLM's engine arguments (validated by ``cli``)."""

    model_dir: str
    max_model_len: int
    max_num_seqs: int
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    block_size: int | None = None
    enforce_eager: bool = False

    def engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        return AsyncEngineArgs(
            model=self.model_dir,
            skip_tokenizer_init=True,  # the verifier tokenizes (the GGUF's vocabulary); vLLM sees ids
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            enable_prefix_caching=True,
            max_logprobs=-1,  # full rows on demand (a failed certificate, TLI)
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            distributed_executor_backend=self.distributed_executor_backend,
            gpu_memory_utilization=self.gpu_memory_utilization,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            block_size=self.block_size,
            enforce_eager=self.enforce_eager,
            disable_log_stats=True,
        )



def add_vllm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM engine (--engine vllm; install with scripts/setup-vllm.sh)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and activations (default: the checkpoint's)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs a layer is split across")
    g.add_argument("--pipeline-parallel-size", type=int, default=1, help="stages the layers are split into (GPUs or nodes)")
    g.add_argument("--distributed-executor-backend", choices=EXECUTOR_BACKENDS, default=None,
                   help="mp: one node's GPUs; ray: across nodes (a Ray cluster must be running); default: vLLM's choice")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of GPU memory (on a CPU build: of host memory) for weights and KV cache")
    g.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size, overriding --gpu-memory-utilization")
    g.add_argument("--block-size", type=int, default=32, help="KV block tokens: prefix-cache hits come in whole blocks")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs or torch.compile (starts faster)")
    g.add_argument("--tokenizer", metavar="NAME_OR_GGUF",
                   help="for a directory not converted here: the same model's GGUF, whose vocabulary the verifier tokenizes with")
    g.add_argument("--top-k-rows", type=int, default=20,
                   help="log-probabilities per position a round reads (greedy needs 2; SLEM certifies from them)")
    g.add_argument("--full-rows", action="store_true",
                   help="serve rules that need whole-vocabulary rows every round (TLI): costly on a large vocabulary")


def options_from_args(args: argparse.Namespace, model_dir: Callable[[], str]) -> VllmOptions:
    """The engine's options; a bad combination raises ``ValueError`` naming the flag. The flags
    are checked first, then that vLLM is installed here, then ``model_dir`` finds the model."""
    for flag in ("tensor_parallel_size", "pipeline_parallel_size", "block_size", "top_k_rows"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.block_size % 16:
        raise ValueError("--block-size must be a multiple of 16 (32 on a CPU build)")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError("--gpu-memory-utilization must be in (0, 1]")
    if args.kv_cache_gb is not None and args.kv_cache_gb <= 0:
        raise ValueError("--kv-cache-gb must be positive")
    if args.distributed_executor_backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError("--distributed-executor-backend ray needs Ray in the vLLM environment: pip install ray")
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--engine vllm needs vLLM in this environment: run scripts/setup-vllm.sh and "
                         "start .venv-vllm/bin/sled-verifier")
    return VllmOptions(
        model_dir=model_dir(),
        max_model_len=args.ctx_per_slot,
        max_num_seqs=args.slots,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=None if args.kv_cache_gb is None else int(args.kv_cache_gb * (1 << 30)),
        block_size=args.block_size,
        enforce_eager=args.enforce_eager,
    )
