#!/usr/bin/env bash
# The README's main job: a verifier with qwen2.5-coder-1.5b and an agent drafting with
# smollm2-135m, generating from a sample prompt on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh qwen2.5-coder-1.5b smollm2-135m
. .venv/bin/activate
PORT=${PORT:-8000}
# --auth none: a lab on loopback (deploy/README.md sets up per-device tokens for a fleet).
sled-verifier serve --model qwen2.5-coder-1.5b --port "$PORT" --auth none --no-access-log &
VERIFIER=$!
trap 'kill $VERIFIER 2>/dev/null || true' EXIT
python - "$PORT" <<'PY'
import sys, time, httpx
for _ in range(240):
    try:
        if httpx.get(f"http://127.0.0.1:{sys.argv[1]}/v1/health", timeout=1).status_code == 200:
            break
    except httpx.HTTPError:
        time.sleep(0.5)
else:
    sys.exit("the verifier did not come up")
PY
sled-agent generate --server "http://127.0.0.1:$PORT" --drafter smollm2-135m --max-tokens 128 \
    "${1:-def merge_sort(items):
}"
