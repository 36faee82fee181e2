#!/usr/bin/env bash
# Install nginx from Debian's packages (nginx-light) when it is missing: the load-balancer tests
# run it in front of two verifiers. Needs root (or sudo); where neither is available the tests
# that need nginx are skipped and say why.
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-nginx: not root and no sudo: the nginx tests will be skipped" >&2
        exit 0
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-nginx: no apt-get here: install nginx by hand, or the nginx tests will be skipped" >&2
    exit 0
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
echo "install-nginx: $(/usr/sbin/nginx -v 2>&1)" >&2
