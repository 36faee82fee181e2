#!/usr/bin/env bash
# Install the edge agent on a board (Jetson, Raspberry Pi) as a service: the agent's dependencies
# only (no torch, no verifier), llama.cpp built for CUDA on a Jetson (detected) and for the CPU
# elsewhere, the drafter the fleet file names for this device, and a systemd unit running
# `sled-agent serve --config /etc/sled/fleet.yaml --device DEVICE_ID`.
#
#   sudo deploy/install-agent.sh DEVICE_ID [FLEET.yaml]    (default fleet file: /etc/sled/fleet.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:?usage: deploy/install-agent.sh DEVICE_ID [FLEET.yaml]}
FLEET=${2:-/etc/sled/fleet.yaml}
PREFIX=/opt/sled

if [ -f /etc/nv_tegra_release ] || [ -d /usr/local/cuda ]; then
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_CUDA=on"   # a Jetson: the drafter runs on its GPU
    echo "CUDA found: building llama.cpp with -DGGML_CUDA=on"
fi
python3 -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install --quiet --upgrade pip
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PREFIX/bin/python" -m pip install --quiet ".[agent]"

install -d /etc/sled
if [ "$FLEET" != /etc/sled/fleet.yaml ]; then
    install -m 0644 "$FLEET" /etc/sled/fleet.yaml
fi
"$PREFIX/bin/sled-agent" config validate /etc/sled/fleet.yaml
DRAFTER=$("$PREFIX/bin/sled-agent" config show /etc/sled/fleet.yaml --device "$DEVICE" |
          "$PREFIX/bin/python" -c "import sys, yaml; print(yaml.safe_load(sys.stdin)['settings']['drafter'])")
# Models are cached for the service's user; a registry name is fetched now, a path must exist.
id -u sled >/dev/null 2>&1 || useradd --system --create-home --home-dir /var/lib/sled sled
sudo -u sled -H "$PREFIX/bin/python" -c "import sys; from shared.models import fetch, REGISTRY; \
    print(fetch(sys.argv[1]) if sys.argv[1] in REGISTRY else sys.argv[1])" "$DRAFTER"

sed "s/@DEVICE@/$DEVICE/" deploy/sled-agent.service > /etc/systemd/system/sled-agent.service
systemctl daemon-reload
systemctl enable --now sled-agent.service
echo "sled-agent is serving the OpenAI API for device $DEVICE (systemctl status sled-agent)"
