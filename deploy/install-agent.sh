#!/usr/bin/env bash
# Install the edge agent on a board (Jetson, Raspberry Pi) as a service: the agent's dependencies
# only (no torch, no verifier), llama.cpp built for CUDA on a Jetson (detected) and for the CPU
# elsewhere, the drafter the fleet file names for this device, its token's file at mode 600, and a
# systemd unit running `sled-agent serve --config /etc/sled/fleet.yaml --device DEVICE_ID`.
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
# The device's drafter and where its token is ('-': not that way), one per line.
{ read -r DRAFTER; read -r TOKEN_ENV; read -r TOKEN_FILE; } < <(
    "$PREFIX/bin/sled-agent" config show /etc/sled/fleet.yaml --device "$DEVICE" |
    "$PREFIX/bin/python" -c "import sys, yaml; d = yaml.safe_load(sys.stdin); \
        print(d['settings']['drafter'], d['token_env'] or '-', d['token_file'] or '-', sep='\n')")
# Models are cached for the service's user; a registry name is fetched now, a path must exist.
id -u sled >/dev/null 2>&1 || useradd --system --create-home --home-dir /var/lib/sled sled
sudo -u sled -H "$PREFIX/bin/python" -c "import sys; from shared.models import fetch, REGISTRY; \
    print(fetch(sys.argv[1]) if sys.argv[1] in REGISTRY else sys.argv[1])" "$DRAFTER"

# Credentials: a token lets anyone act as this device, so its files are readable by their reader
# only (mode 600): /etc/sled/agent.env by systemd (root), which passes it to the service, and a
# token_file by the service's user. Missing ones are created empty at that mode, so that the token
# is then written into a file nobody else can read (a shell's `>` keeps the mode).
AGENT_ENV=/etc/sled/agent.env
if [ "$TOKEN_ENV" != - ] && [ ! -e "$AGENT_ENV" ]; then
    install -m 600 -o root -g root /dev/null "$AGENT_ENV"
fi
if [ -e "$AGENT_ENV" ]; then
    chown root:root "$AGENT_ENV"
    chmod 600 "$AGENT_ENV"
fi
if [ "$TOKEN_ENV" != - ] && ! grep -q "^$TOKEN_ENV=" "$AGENT_ENV"; then
    echo "install-agent: add $TOKEN_ENV=<token> to $AGENT_ENV (sled-verifier tokens new --device $DEVICE" \
         "prints it), then: systemctl restart sled-agent" >&2
fi
if [ "$TOKEN_FILE" != - ]; then
    if [ ! -e "$TOKEN_FILE" ]; then
        install -D -m 600 -o sled -g sled /dev/null "$TOKEN_FILE"
    fi
    chown sled:sled "$TOKEN_FILE"
    chmod 600 "$TOKEN_FILE"
    if [ ! -s "$TOKEN_FILE" ]; then
        echo "install-agent: write this device's token to $TOKEN_FILE, then: systemctl restart sled-agent" >&2
    fi
fi

sed "s/@DEVICE@/$DEVICE/" deploy/sled-agent.service > /etc/systemd/system/sled-agent.service
systemctl daemon-reload
systemctl enable --now sled-agent.service
echo "sled-agent is serving the OpenAI API for device $DEVICE (systemctl status sled-agent)"
