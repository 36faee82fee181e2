#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the agent, verifier and test
# dependencies, and the models named as arguments assembled into ~/.cache/sled/models.
# llama-cpp-python compiles from source the first time (about 9 minutes on 2 cores); pip caches
# the wheel, so later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    python -m pip install --quiet -e ".[agent,verifier,bench,dev]"
if [ "$#" -gt 0 ]; then
    sled-verifier models fetch "$@"
fi
