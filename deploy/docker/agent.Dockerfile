# The edge agent: `sled-agent serve` with the `agent` extra only (no torch, no verifier).
# Build from the repository root, for the boards (arm64) on any machine with buildx:
#   Raspberry Pi 5 / CPU:
#     docker buildx build --platform linux/arm64 -f deploy/docker/agent.Dockerfile -t sled-agent \
#       --build-arg CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" --load .
#   Jetson (Orin, JetPack 6), llama.cpp on the GPU:
#     docker buildx build --platform linux/arm64 -f deploy/docker/agent.Dockerfile -t sled-agent:jetson \
#       --build-arg BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0 --build-arg CMAKE_ARGS="-DGGML_CUDA=on" --load .
#     and run it with `--runtime nvidia`, `gpu_layers` set in the fleet file.
# Without CMAKE_ARGS llama.cpp is tuned to the CPU that compiles it (under emulation, not the board's):
# name the board's architecture as above, or build on the board itself.
#
# The device id is a flag: give the whole command, e.g.
#   docker run -d --network host -v sled-models:/var/cache/sled -v "$PWD/fleet.yaml:/etc/sled/fleet.yaml:ro" \
#     --env-file agent.env sled-agent serve --config /etc/sled/fleet.yaml --device pi-kitchen --port 8080
# (compose passes it as `command:`). agent.env holds the token variable the fleet file names
# (`token_env`), made by `sled-verifier tokens new --device ID`.
# The API listens on 127.0.0.1 (with --network host: the board's loopback, its local apps only). To
# serve other machines, give it a key that apps send as `Authorization: Bearer KEY`:
#   ... -v "$PWD/agent-api.key:/etc/sled/agent-api.key:ro" sled-agent serve ... --host 0.0.0.0 \
#     --api-key-file /etc/sled/agent-api.key
# Without a key the agent refuses any address but loopback (--insecure-listen overrides that, e.g.
# inside a bridge network whose port is published on 127.0.0.1 only).
# Models are not in the image: fetch the device's drafter into the volume once (as root: fetching
# pip-installs the model's parts into this throwaway container's venv):
#   docker run --rm --user root -v sled-models:/var/cache/sled --entrypoint python sled-agent \
#     -c "from shared.models import fetch; print(fetch('smollm2-135m'))"
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=${BASE_IMAGE}

FROM ${BASE_IMAGE} AS builder
ARG CMAKE_ARGS=""
# A folder of wheels inside the build context (scripts/docker-up.sh makes one, with llama.cpp
# compiled once on the host for both images): install from it alone, with no network and no
# compiler. Empty (the default): install from PyPI, compiling llama.cpp here.
ARG WHEELHOUSE=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Build tools for llama.cpp unless a wheelhouse brings it compiled; Python only where the base lacks
# it. A base that has all it needs is not touched: with a wheelhouse, the build needs no network.
# hadolint ignore=DL3008
RUN set --; \
    if [ -z "$WHEELHOUSE" ]; then set -- "$@" build-essential cmake git; fi; \
    if ! python3 -c "import ensurepip" 2>/dev/null; then set -- "$@" python3 python3-venv; fi; \
    if [ "$#" -gt 0 ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends "$@" \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python3 -m venv /opt/sled
WORKDIR /src
COPY . .
RUN if [ -n "$WHEELHOUSE" ]; then \
        /opt/sled/bin/pip install --no-cache-dir --no-index --find-links "$WHEELHOUSE" "sled[agent]"; \
    else \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" /opt/sled/bin/pip install --no-cache-dir ".[agent]"; \
    fi

FROM ${RUNTIME_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# libgomp for llama.cpp's threads and Python, where the base lacks them.
# hadolint ignore=DL3008
RUN set --; \
    if ! ldconfig -p | grep -q 'libgomp\.so\.1'; then set -- "$@" libgomp1; fi; \
    if ! command -v python3 >/dev/null; then set -- "$@" python3; fi; \
    if [ "$#" -gt 0 ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends "$@" \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 sled \
    && useradd --system -l --uid 10001 --gid sled --create-home --home-dir /var/lib/sled \
               --shell /usr/sbin/nologin sled \
    && install -d -o sled -g sled /var/cache/sled /var/cache/sled/models /var/cache/sled/vocab
COPY --from=builder /opt/sled /opt/sled
ENV PATH=/opt/sled/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SLED_MODEL_CACHE=/var/cache/sled/models \
    SLED_VOCAB_CACHE=/var/cache/sled/vocab
VOLUME ["/var/cache/sled"]
# sled (the same uid as the verifier image's, so that both can share a model volume)
USER 10001:10001
WORKDIR /var/lib/sled
EXPOSE 8080
# python, not curl (slim images have none); any answer but a 2xx counts as unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["sled-agent"]
# DEVICE is a placeholder (it fails with the fleet file's list of devices): pass the real command.
CMD ["serve", "--config", "/etc/sled/fleet.yaml", "--device", "DEVICE", "--host", "127.0.0.1", "--port", "8080"]
