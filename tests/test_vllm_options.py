"""``--engine vllm``'s flags are checked before anything loads: a bad value, or a machine without
vLLM, is a one-line CLI error naming what to fix (no traceback). Runs in the main environment,
which has no vLLM (boards and llama.cpp verifiers never install it)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

BASE = ["serve", "--engine", "vllm", "--model", "qwen2.5-coder-0.5b", "--auth", "none"]


def _serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "verifier_server.cli", *BASE, *flags],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flags,message", [
    (("--tensor-parallel-size", "0"), "--tensor-parallel-size must be at least 1"),
    (("--pipeline-parallel-size", "-2"), "--pipeline-parallel-size must be at least 1"),
    (("--gpu-memory-utilization", "1.5"), "--gpu-memory-utilization must be in (0, 1]"),
    (("--block-size", "20"), "--block-size must be a multiple of 16"),
    (("--kv-cache-gb", "0"), "--kv-cache-gb must be positive"),
    (("--top-k-rows", "0"), "--top-k-rows must be at least 1"),
    (("--replay", "x.jsonl"), "llama.cpp's"),
])
def test_a_bad_flag_is_a_clear_cli_error(flags, message):
    done = _serve(*flags)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_unknown_executor_backend_is_refused_by_the_parser():
    done = _serve("--distributed-executor-backend", "slurm")
    assert done.returncode == 2 and "invalid choice" in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this environment has vLLM")
def test_without_vllm_the_error_says_how_to_install_it():
    done = _serve()
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "scripts/setup-vllm.sh" in done.stderr, done.stderr
