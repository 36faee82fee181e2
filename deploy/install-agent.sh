#!/usr/bin/env bash
# Install the edge agent on a board (Jetson, Raspberry Pi): only the agent's dependencies, no web
# server, no torch. Usage: deploy/install-agent.sh [DRAFTER]   (default smollm2-135m)
# On a Jetson, build llama.cpp with CUDA: CMAKE_ARGS="-DGGML_CUDA=on" deploy/install-agent.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet ".[agent]"
# The registry's fetch lives with the shared package; it installs the drafter's parts with pip.
python -c "import sys; from shared.models import fetch; print(fetch(sys.argv[1]))" "${1:-smollm2-135m}"
echo "installed: .venv/bin/sled-agent generate --server http://VERIFIER:8000 --drafter ${1:-smollm2-135m} PROMPT"
