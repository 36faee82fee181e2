#!/usr/bin/env bash
# The container stack's prerequisites, for tests/test_containers.py (.ci/run calls this; the README's
# two commands do not need it): a running Docker engine, docker-compose, and the project's images
# built from deploy/docker/ with the tag $SLED_IMAGE_TAG (default: ci).
#
#   - the engine: Debian's docker.io and docker-compose installed when missing (as root), dockerd
#     started when none answers (scripts/docker-down.sh stops only a dockerd this script started);
#   - the base: the official python:3.11-slim-bookworm when it is present or can be pulled, otherwise
#     a local Debian bookworm made with debootstrap (--variant=minbase, with Python, libgomp and
#     nginx-light) and `docker import`; on that base the images build with --network none;
#   - a wheelhouse (.wheelhouse/, ignored by git): the project and its dependencies as wheels, with
#     llama-cpp-python compiled once (pip's cache, shared with .venv) for both images, so that the
#     images install with --no-index and no compiler.
# Run scripts/setup.sh first (.venv). Image builds add about 1.5 minutes with a warm pip cache.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(base) stops the script
cd "$(dirname "$0")/.."
TAG=${SLED_IMAGE_TAG:-ci}
OFFICIAL_BASE=python:3.11-slim-bookworm
LOCAL_BASE=sled-base:bookworm-1  # bump when its packages change
# What the images need from Debian, in the local base: the images then build with no network at all.
BASE_PACKAGES=python3,python3-venv,libgomp1,nginx-light,wget
MIRROR=${SLED_DEBIAN_MIRROR:-http://deb.debian.org/debian}
STATE=${XDG_RUNTIME_DIR:-/tmp}/sled-docker
export DOCKER_BUILDKIT=0  # the classic builder: Debian's engine has no buildx plugin

mkdir -p "$STATE"

say() { echo "docker-up: $*" >&2; }

apt_install() {
    if [ "$(id -u)" != 0 ]; then
        say "missing $*; install it (as root: apt-get install -y $*) or run this as root"
        exit 1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

engine() {
    command -v dockerd >/dev/null || apt_install docker.io
    command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || apt_install docker-compose
    if docker info >/dev/null 2>&1; then
        return
    fi
    say "starting dockerd (log: $STATE/dockerd.log)"
    nohup dockerd >"$STATE/dockerd.log" 2>&1 &
    echo $! >"$STATE/dockerd.pid"
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        sleep 1
    done
    say "dockerd did not answer within 60 s:"
    tail -20 "$STATE/dockerd.log" >&2
    exit 1
}

# Prints the base image to build from.
base() {
    if docker image inspect "$OFFICIAL_BASE" >/dev/null 2>&1 || timeout 60 docker pull -q "$OFFICIAL_BASE" >/dev/null 2>&1; then
        echo "$OFFICIAL_BASE"
        return
    fi
    if ! docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || apt_install debootstrap
        say "$OFFICIAL_BASE cannot be pulled: making $LOCAL_BASE with debootstrap from $MIRROR"
        root=$(mktemp -d)
        debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$root" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 \
            || { tail -20 "$STATE/debootstrap.log" >&2; exit 1; }
        # As the official Debian images do: no package files kept after an install.
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        printf '%s\n' 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };' \
            'Binary::apt::APT::Keep-Downloaded-Packages "false";' >"$root/etc/apt/apt.conf.d/docker-clean"
        tar -C "$root" -c . | docker import - "$LOCAL_BASE" >/dev/null
        rm -rf "$root"
    fi
    echo "$LOCAL_BASE"
}

build() {  # build NAME DOCKERFILE [ARGS...]
    local name=$1 dockerfile=$2
    shift 2
    say "building $name:$TAG"
    docker build -q -f "$dockerfile" -t "$name:$TAG" "$@" . >/dev/null
}

engine
from=$(base)
rm -rf .wheelhouse
.venv/bin/pip wheel --quiet --wheel-dir .wheelhouse ".[agent,verifier]" 2>"$STATE/wheel.log" \
    || { tail -20 "$STATE/wheel.log" >&2; exit 1; }
offline=()
if [ "$from" = "$LOCAL_BASE" ]; then
    offline=(--network none)  # everything is in the base and the wheelhouse
fi
build sled-verifier deploy/docker/verifier.Dockerfile "${offline[@]}" --build-arg BASE_IMAGE="$from" --build-arg WHEELHOUSE=.wheelhouse
build sled-agent deploy/docker/agent.Dockerfile "${offline[@]}" --build-arg BASE_IMAGE="$from" --build-arg WHEELHOUSE=.wheelhouse
build sled-nginx deploy/docker/nginx.Dockerfile "${offline[@]}" --build-arg BASE_IMAGE="$from"
docker image prune -f >/dev/null  # the builder stages
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep ":$TAG " | sed 's/^/docker-up: image /' >&2
