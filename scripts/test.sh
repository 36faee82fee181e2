#!/usr/bin/env bash
# The README's test command: set up (idempotent), fetch the test models, set up the vLLM engine's
# environment with its test model converted, install nginx when missing, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh qwen2.5-coder-0.5b smollm2-135m gemma-3-270m
scripts/setup-vllm.sh qwen2.5-coder-0.5b  # the vLLM engine's tests (tests/test_vllm.py)
scripts/install-nginx.sh  # the load-balancer tests run real nginx (Debian's nginx-light)
. .venv/bin/activate
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "no tests were collected: failing" >&2
    exit 1
fi
exit "$rc"
